"""Latent consistency distillation of Stable Diffusion 1.5 (LCM, Luo et al.; diffusers'
train_lcm_distill_sd_wds.py settings): a 4-step student with LCM's w embedding.

The student is SD1.5's UNet with ``time_cond_proj_dim`` 256 (its ``cond_proj`` zero-initialised, so
it starts as the teacher); the teacher takes one DDIM step with classifier-free guidance at
g ~ U[6, 16] (LCM's w in [5, 15], w = g - 1) against the empty prompt; the target is the EMA
(0.95) student; pseudo-Huber loss (c = 0.001). Data: VAE latents of captioned images with the
frozen text encoder's embeddings (the bundled photographs by default; point ``data.name`` at any
TFDS dataset with ``image`` and ``caption``). The distilled UNet samples in diffusers'
LatentConsistencyModelPipeline convention (``TextToImage`` passes the w embedding as
``timestep_cond``).

    jdistill distill --config configs/sd15_lcm.py --workdir runs/sd15_lcm
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "lcm"
    c.seed = 0
    c.teacher = dict(pipeline="stable-diffusion-v1-5", models_dir="", cache_dir="")
    c.data = dict(name="photo_patches/64", resolution=512, caption_template="a photo of {photo}", batch_size=8,
                  max_examples=0, data_dir=None)
    c.lcm = dict(steps=4000, num_steps=50, scale_range=(6.0, 16.0), solver="ddim", distance="huber", huber_c=0.001,
                 timestep_scaling=10.0, target_decay=0.95)
    c.optim = dict(lr=1e-6, warmup=500, decay="constant", end_factor=1.0, b1=0.9, b2=0.999, weight_decay=1e-2,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.0, log_every=50, ckpt_every=500, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=4, solver="lcm", guidance_scale=8.0, prompts=("a photo of astronaut", "a photo of coffee"))
    return c
