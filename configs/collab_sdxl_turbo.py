"""Adaptive collaboration, the paper's second recipe: SDXL-Turbo (2 steps) samples, an oracle scores,
the SDXL refiner (text_encoder_2 alone, aesthetic-score time ids) refines the lowest-scoring half
with img2img at strength 0.3 for 4 steps (Starodubcev et al., CVPR 2024).

    jdistill sample --config configs/collab_sdxl_turbo.py --out runs/collab_turbo/samples.npz \
        --config.oracle.model=path/to/PickScore_v1 --config.oracle.tokenizer=path/to/CLIP-ViT-H-14
"""

import ml_collections

from jdistill.recipes.collab_t2i import CALIBRATION_PROMPTS


def get_config():
    c = ml_collections.ConfigDict()
    c.recipe = "collab"
    c.task = "text_to_image"
    c.models_dir = None
    c.cache_dir = None
    # SDXL-Turbo as published: trailing Euler ancestral, no guidance, 512 px
    c.student = dict(pipeline="sdxl-turbo", steps=2, guidance_scale=0.0)
    c.teacher = dict(pipeline="sdxl-refiner", steps=4, guidance_scale=5.0, form="img2img", strength=0.3)
    c.oracle = dict(name="pickscore", model="", tokenizer="", size=224)
    c.k = 50.0
    c.calibration = dict(prompts=CALIBRATION_PROMPTS, seed=1, file="")
    c.sample = dict(prompts=["a photo of an astronaut riding a horse", "a bowl of fruit, still life"],
                    negative_prompt="", size=(512, 512), batch_size=4, buckets=4)
    return c
