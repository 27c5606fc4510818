"""Guided distillation of Stable Diffusion 1.5 (Meng et al., latent text-to-image setting).

The teacher is the SD1.5 pipeline (a diffusers folder or its converted jdistill folder, by path
or under $JDISTILL_MODELS); the student is its UNet plus a guidance embedding. Training data are
VAE latents of captioned images with the frozen CLIP text encoder's prompt embeddings; the
bundled real data are scikit-image's photographs (photo_patches, captioned "a photo of
<name>"); point ``data.name`` at any TFDS dataset with ``image`` and ``caption`` features for
real use. On TPU pods / GPU clusters raise ``mesh.fsdp`` to shard the UNet and its optimizer.

    jdistill distill --config configs/sd15_guided.py --workdir runs/sd15_guided
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "guided"
    c.seed = 0
    c.teacher = dict(pipeline="stable-diffusion-v1-5", models_dir="", cache_dir="")
    c.data = dict(name="photo_patches/64", resolution=512, caption_template="a photo of {photo}", batch_size=8,
                  max_examples=0, data_dir=None)
    c.guidance = dict(scale_range=(2.0, 14.0))  # SD's useful CFG range (Meng et al.'s w = g - 1)
    optim = dict(lr=1e-5, warmup=200, decay="linear", end_factor=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
                 clip_norm=1.0)
    c.stage1 = dict(steps=10000, weighting="truncated_snr", optim=dict(optim))
    c.progressive = dict(start_steps=32, end_steps=1, weighting="truncated_snr", train_steps={"default": 5000},
                         optim=dict(optim))
    # nonfinite: a NaN / inf loss, gradient or param, or a divergent update (one over max_update_ratio times
    # its part's norm), stops the run by name ("skip": count it, go on)
    c.train = dict(ema_decay=0.0, log_every=50, ckpt_every=500, keep=2, sample_every=0,
                   nonfinite="stop", max_update_ratio=100.0)
    c.mesh = dict(data=-1, fsdp=1)
    c.sample = dict(steps=4, guidance_scale=7.5, prompts=("a photo of astronaut", "a photo of coffee"))
    return c
