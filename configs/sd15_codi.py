"""CoDi on Stable Diffusion 1.5 (eps): 4x super-resolution with a ControlNet adapter.

The conditional model is SD1.5's UNet (with LCM's w embedding, so guidance is an input) plus the
project's ControlNet initialised from the UNet's encoder (diffusers' ``ControlNetModel.from_unet``;
its zero convs leave the UNet unchanged at init), reading the condition image in pixel space.
The PF-ODE step of the target is taken by the conditional model itself with classifier-free
guidance of the prompt (the image condition on both sides), g ~ U[2, 8]; loss = consistency +
the latent-space x0 error (the paper's conditional guidance). ``methods``: CoDi (UNet and
ControlNet train) and PE-CoDi (ControlNet only, the released code's setting); add "finetune" /
"two_stage" for the baselines. Settings as the released code: AdamW lr 1e-5, wd 1e-2, clip 1.

    jdistill distill --config configs/sd15_codi.py --workdir runs/sd15_codi
    jdistill sample --workdir runs/sd15_codi/codi --condition lowres.npz --steps 4
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "codi"
    c.seed = 0
    c.teacher = dict(pipeline="stable-diffusion-v1-5", models_dir="", cache_dir="")
    c.data = dict(name="photo_patches/64", resolution=512, caption_template="a photo of {photo}", batch_size=4,
                  max_examples=0, data_dir=None)
    c.condition = dict(kind="sr4")
    c.adapter = dict(kind="controlnet", width=32, copy_depth=0, conditioning_embedding_out_channels=(16, 32, 96, 256))
    c.methods = ("codi", "pe_codi")
    budget = 10000
    c.finetune = dict(steps=budget, weighting="constant")
    c.lcm = dict(steps=budget // 2, num_steps=50, scale_range=None, solver="ddim", distance="l2", huber_c=0.001,
                 timestep_scaling=10.0, target_decay=0.95)
    c.two_stage = dict(finetune_steps=budget // 2)
    c.codi = dict(steps=budget, num_steps=50, scale_range=(2.0, 8.0), guidance_weight=1.0, ode="model",
                  solver="ddim", distance="l2", huber_c=0.001, timestep_scaling=10.0, target_decay=0.999)
    c.optim = dict(lr=1e-5, warmup=500, decay="constant", end_factor=1.0, b1=0.9, b2=0.999, weight_decay=1e-2,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.0, log_every=50, ckpt_every=500, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=4, solver="codi", guidance_scale=7.5, prompts=("a photo of astronaut", "a photo of coffee"))
    return c
