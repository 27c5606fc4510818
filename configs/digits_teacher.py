"""The digits teacher: a 1.2M-parameter class-conditional DiT on sklearn's real 8x8 digits.

v-prediction on the continuous cosine schedule (what guided / progressive distillation
start from), label dropout 0.1 for classifier-free guidance. About 3000 steps at
batch 128: minutes on two CPU cores.

    jdistill train --config configs/digits_teacher.py --workdir runs/digits_teacher
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "teacher"
    c.seed = 0
    c.model = dict(name="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                   num_classes=10)
    c.diffusion = dict(kind="cosine", prediction="v", logsnr_min=-20.0, logsnr_max=20.0)
    c.data = dict(name="digits", batch_size=128, data_dir=None)
    c.loss = dict(weighting="constant", cond_drop_prob=0.1, min_snr_gamma=5.0, time_sampling="uniform")
    c.optim = dict(lr=1e-3, warmup=200, decay="cosine", end_factor=0.05, b1=0.9, b2=0.99, weight_decay=0.0,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(steps=3000, ema_decay=0.999, log_every=50, ckpt_every=500, keep=2, sample_every=1000,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    # sampling defaults: grids while training, `jdistill sample`, the demo
    c.sample = dict(steps=64, solver="ddim", guidance_scale=1.5)
    return c
