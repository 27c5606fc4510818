"""Latent consistency distillation of SDXL base 1.0 (LCM-SDXL, Luo et al.; diffusers'
train_lcm_distill_sdxl_wds.py settings): a 4-step student with LCM's w embedding, 1024 px.

As ``configs/sd15_lcm.py`` with SDXL's pipeline: the student is SDXL's UNet with
``time_cond_proj_dim`` 256 (``cond_proj`` zero-initialised, so it starts as the teacher); the
teacher takes one DDIM step with classifier-free guidance at g ~ U[4, 16] (the script's w in
[3, 15], w = g - 1) against the empty prompt; the target is the EMA (0.95) student; pseudo-Huber
loss (c = 0.001), lr 1e-6, no weight decay. SDXL's time ids are the fixed 1024 x 1024, no crop
(the script's ``--use_fix_crop_and_size``). The 2.6B-parameter student, its target, its Adam
moments and the frozen teacher are about 51 GB in fp32, so the state is sharded over ``fsdp``
(docs/pod-scale.md plans it on v5p and H100 meshes).

    jdistill distill --config configs/sdxl_lcm.py --workdir runs/sdxl_lcm
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "lcm"
    c.seed = 0
    c.teacher = dict(pipeline="sdxl", models_dir="", cache_dir="")
    c.data = dict(name="photo_patches/64", resolution=1024, caption_template="a photo of {photo}", batch_size=8,
                  max_examples=0, data_dir=None)
    c.lcm = dict(steps=4000, num_steps=50, scale_range=(4.0, 16.0), solver="ddim", distance="huber", huber_c=0.001,
                 timestep_scaling=10.0, target_decay=0.95)
    c.optim = dict(lr=1e-6, warmup=500, decay="constant", end_factor=1.0, b1=0.9, b2=0.999, weight_decay=0.0,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.0, log_every=50, ckpt_every=500, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=4)
    c.sample = dict(steps=4, solver="lcm", guidance_scale=8.0, prompts=("a photo of astronaut", "a photo of coffee"))
    return c
