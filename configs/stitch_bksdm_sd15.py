"""T-Stitch for text-to-image: BK-SDM-tiny (nota-ai/bk-sdm-tiny) for the early steps, Stable
Diffusion 1.5 for the rest. Both pipelines share SD1.5's text encoder and VAE weights; each UNet
applies its own CFG. The reference implementation's SD pipelines switch by step index, so this
config does too (mode "step"; "timestep" is the paper's rule).

Give the two diffusers pipeline folders (or their converted jdistill folders) under
$JDISTILL_MODELS or as paths.

    jdistill sample --config configs/stitch_bksdm_sd15.py --num 4 --out runs/stitch_sd/samples.npz
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "stitch"
    c.task = "text_to_image"
    c.models_dir = ""
    c.cache_dir = ""
    c.small = dict(pipeline="bk-sdm-tiny")
    c.large = dict(pipeline="stable-diffusion-v1-5")
    c.fraction = 0.4
    c.mode = "step"
    c.sample = dict(steps=50, solver="ddim", guidance_scale=7.5, size=(512, 512), negative_prompt="",
                    prompts=("a photograph of an astronaut riding a horse", "a bowl of cherries on a wooden table"))
    return c
