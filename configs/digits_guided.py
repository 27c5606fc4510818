"""Guided distillation of the digits teacher (Meng et al.): stage 1, then 32 -> 16 -> ... -> 1 steps.

Guidance scales g in [1, 3] (diffusers' convention; Meng et al.'s w in [0, 2]).
The teacher is trained first (with configs/digits_teacher.py) if its workdir
holds no finished run.

    jdistill distill --config configs/digits_guided.py --workdir runs/digits_guided
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "guided"
    c.seed = 0
    c.teacher = dict(workdir="runs/digits_teacher", config="configs/digits_teacher.py")
    c.data = dict(name="digits", batch_size=128, data_dir=None)
    c.guidance = dict(scale_range=(1.0, 3.0))
    optim = dict(lr=2e-4, warmup=50, decay="linear", end_factor=0.0, b1=0.9, b2=0.99, weight_decay=0.0,
                 clip_norm=1.0)
    c.stage1 = dict(steps=1500, weighting="truncated_snr", optim=dict(optim))
    # the first student takes start_steps steps, learning from stage 1 used as a 2x-step teacher
    c.progressive = dict(start_steps=32, end_steps=1, weighting="truncated_snr",
                         train_steps={"default": 800, "2": 1200, "1": 2000}, optim=dict(optim, lr=1e-4))
    # Meng et al. use no EMA for distillation
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.0, log_every=50, ckpt_every=250, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=64, guidance_scale=1.5)
    return c
