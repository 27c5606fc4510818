"""The digits flow teacher: the digits DiT (configs/digits_teacher.py) trained by rectified flow
matching, as SD3 is: velocity prediction u = eps - x on z_t = (1 - t) x + t eps, training times
logit-normal(0, 1) then SD3's shift t' = S t / (1 + (S - 1) t), label dropout 0.1 for
classifier-free guidance. Sampled with Euler + CFG on the shifted flow grid. It is the teacher
of LADD (configs/digits_ladd.py) and of the progressive / consistency students the LADD table
compares against it.

    jdistill train --config configs/digits_flow_teacher.py --workdir runs/digits_flow_teacher
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "teacher"
    c.seed = 0
    c.model = dict(name="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                   num_classes=10)
    c.diffusion = dict(kind="flow", prediction="flow", shift=3.0)
    c.data = dict(name="digits", batch_size=128, data_dir=None)
    c.loss = dict(weighting="constant", cond_drop_prob=0.1, time_sampling="logit_normal", logit_mean=0.0,
                  logit_std=1.0)
    c.optim = dict(lr=1e-3, warmup=200, decay="cosine", end_factor=0.05, b1=0.9, b2=0.99, weight_decay=0.0,
                   clip_norm=1.0)
    c.train = dict(steps=3000, ema_decay=0.999, log_every=50, ckpt_every=500, keep=2, sample_every=1000)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=64, solver="euler", guidance_scale=1.5)
    return c
