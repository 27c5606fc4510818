"""Latent consistency distillation (LCM) of the digits teacher: a 4-step student with CFG as an input.

The student is the teacher's DiT plus a zero-initialised guidance embedder; the teacher takes one
DDIM step with classifier-free guidance at g ~ U[1, 3] (diffusers' scale; LCM's w = g - 1) on the
50-step skip grid, the target is the EMA (0.95) student. The teacher is trained first (with
configs/digits_teacher.py) if its workdir holds no finished run.

    jdistill distill --config configs/digits_lcm.py --workdir runs/digits_lcm
    jdistill lcm-table --workdir runs/digits_lcm --out runs/lcm_table
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "lcm"
    c.seed = 0
    c.teacher = dict(workdir="runs/digits_teacher", config="configs/digits_teacher.py")
    c.data = dict(name="digits", batch_size=64, data_dir=None)
    # LCM's settings; scale_range in diffusers' convention (None: no guidance)
    c.lcm = dict(steps=1200, num_steps=50, scale_range=(1.0, 3.0), solver="ddim", distance="l2", huber_c=0.001,
                 timestep_scaling=10.0, target_decay=0.95)
    c.optim = dict(lr=2e-4, warmup=50, decay="linear", end_factor=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.99, log_every=50, ckpt_every=200, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=4, solver="lcm", guidance_scale=1.5)
    return c
