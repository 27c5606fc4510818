"""An unconditional prior of photographs: a DiT on 32x32 photo_patches crops (the CoDi photo prior).

Cosine schedule, v-prediction, patch 4 (64 tokens a crop): small enough for minutes on two CPU
cores. No class input (``num_classes=0``).

    jdistill train --config configs/photo_teacher.py --workdir runs/photo_teacher
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "teacher"
    c.seed = 0
    c.model = dict(name="dit", input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=4, num_heads=4,
                   num_classes=0)
    c.diffusion = dict(kind="cosine", prediction="v", logsnr_min=-20.0, logsnr_max=20.0)
    c.data = dict(name="photo_patches/32", batch_size=64, data_dir=None)
    c.loss = dict(weighting="constant", cond_drop_prob=0.0, min_snr_gamma=5.0, time_sampling="uniform")
    c.optim = dict(lr=1e-3, warmup=200, decay="cosine", end_factor=0.05, b1=0.9, b2=0.99, weight_decay=0.0,
                   clip_norm=1.0)
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(steps=3000, ema_decay=0.999, log_every=50, ckpt_every=500, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=64, solver="ddim", guidance_scale=1.0)
    return c
