"""Guided + progressive distillation (Meng et al.) of DiT-XL/2 at ImageNet 256 (latents 32x32x4).

The teacher is the original facebookresearch DiT-XL/2 (preset ``dit-xl-2-256-original``:
675M params, learned sigma, 1000 classes + the null class); the student is the teacher plus a
guidance embedding. Data: TFDS ``imagenet2012`` prepared from a manual download as array_record
(``tfds build imagenet2012 --manual_dir=DIR --file_format=array_record``), center-cropped to
256 px and encoded with the SD VAE (ft-EMA) into 32x32x4 latents.

Pod meshes (`jdistill plan --config configs/dit_xl_guided_imagenet.py --mesh ...`, figures in
docs/pod-scale.md; one JAX device is one chip, so a v5p-64 slice is 32 devices):

* TPU v5p-64 (32 chips, 95 GiB each): ``--config.mesh.data=8 --config.mesh.fsdp=4``; fp32 params
  fit with room to spare (student, Adam moments and teacher: about 2.5 GiB / device by hand count),
  batch 256 = 8 per chip;
* 8x H100 80GB (one host): ``--config.mesh.data=2 --config.mesh.fsdp=4``, batch 256 = 32 per GPU
  (bf16 compute: ``--config.model.dtype=bfloat16``);
* TPU v5e (16 GiB): shard wider (``fsdp=16``) and use bf16 compute; see the plan's advice.

    jdistill plan --config configs/dit_xl_guided_imagenet.py --mesh data=8,fsdp=4 --target v5p
    jdistill distill --config configs/dit_xl_guided_imagenet.py --workdir runs/dit_xl_guided
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "guided"
    c.seed = 0
    c.teacher = dict(checkpoint="dit-xl-2-256-original", models_dir="", cache_dir="")
    # set on the teacher and the student: compute / storage precision (and, once the models have them,
    # activation checkpointing: add e.g. remat=True here)
    # depth: DiT-XL/2's 28 blocks as published; `jdistill plan --config.model.depth=1` (and 2) measures
    # one block's cost where compiling all 28 for a pod mesh takes too long on a small machine
    c.model = dict(dtype="float32", param_dtype="float32", depth=28)
    # DiT's diffusion: linear betas 1e-4..0.02 over 1000 steps, eps prediction (+ learned variance)
    c.diffusion = dict(kind="discrete", beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4,
                       beta_end=0.02, prediction="eps")
    c.data = dict(name="imagenet2012", data_dir=None, image_size=256, vae="sd-vae-ft-ema", batch_size=256)
    c.guidance = dict(scale_range=(1.0, 5.0))  # Meng et al.'s w in [0, 4]
    optim = dict(lr=1e-4, warmup=1000, decay="linear", end_factor=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
                 clip_norm=1.0)
    c.stage1 = dict(steps=100_000, weighting="truncated_snr", optim=dict(optim))
    # 64-step teacher (stage 1) -> 32 -> ... -> 1
    c.progressive = dict(start_steps=32, end_steps=1, weighting="truncated_snr", train_steps={"default": 25_000},
                         optim=dict(optim, lr=5e-5))
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.0, log_every=100, ckpt_every=2000, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=4)
    c.sample = dict(steps=8, guidance_scale=4.0)
    return c
