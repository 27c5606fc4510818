"""T-Stitch's headline pair: DiT-S/2 for the first 40% of the trajectory, DiT-XL/2 for the rest
(ImageNet 256, latent, original facebookresearch-layout checkpoints, SD VAE ft-EMA), DDIM 100
steps, CFG 1.5 (the paper: FID-5K 9.2 for XL alone, 8.9 at r = 0.4, about 1.5x faster).

Put the files under $JDISTILL_MODELS (or give paths): DiT-S-2-256x256.pt (T-Stitch's released
DiT-S), DiT-XL-2-256x256.pt (facebookresearch/DiT) and the sd-vae-ft-ema diffusers folder.

    jdistill sample --config configs/stitch_dit_s_xl.py --num 8 --out runs/stitch_dit/samples.npz

Pod sampling (`jdistill plan --config configs/stitch_dit_s_xl.py --mesh data=32`, figures in
docs/pod-scale.md): both networks fit every device whole (708M params, 2.6 GiB in fp32), so the mesh is pure
data parallel: TPU v5p-64 (32 chips) ``--mesh data=32``, 8x H100 ``--mesh data=8``; the batch
(``plan.batch_size``) is split over the devices.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "stitch"
    c.task = "class_to_image"
    c.models_dir = ""  # default: $JDISTILL_MODELS
    c.cache_dir = ""  # conversion cache; default ~/.cache/jdistill/converted
    # `model`: the architecture of each file, what `jdistill plan` compiles (sampling reads the file's own shapes)
    c.small = dict(checkpoint="DiT-S-2-256x256.pt", model=dict(name="dit", preset="DiT-S/2", input_size=32))
    c.large = dict(checkpoint="DiT-XL-2-256x256.pt", model=dict(name="dit", preset="DiT-XL/2", input_size=32))
    c.vae = "sd-vae-ft-ema"
    c.fraction = 0.4  # of the trajectory (by timestep) on the small model
    c.mode = "timestep"  # the paper's rule: t / T >= 1 - fraction goes to the small model
    # DiT: linear betas 1e-4..0.02 over 1000 steps, eps prediction with a learned variance
    c.diffusion = dict(kind="discrete", beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4,
                       beta_end=0.02, prediction="eps")
    # guided_channels=3 reproduces the original code's CFG on 3 of the 4 latent channels
    c.plan = dict(batch_size=1024)  # the global batch `jdistill plan` compiles the sampler for
    c.mesh = dict(data=-1)
    c.sample = dict(steps=100, solver="ddim", guidance_scale=1.5, guided_channels=0,
                    labels=(207, 360, 387, 974, 88, 979, 417, 279))
    return c
