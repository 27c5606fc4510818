"""Adaptive collaboration, the paper's second recipe: SDXL-Turbo (2 steps) samples, an oracle scores,
the SDXL refiner (text_encoder_2 alone, aesthetic-score time ids) refines the lowest-scoring half
with img2img at strength 0.3 for 4 steps (Starodubcev et al., CVPR 2024). The rest (oracle, k,
calibration, sampling options) is configs/collab_lcm_sdxl.py's.

    jdistill sample --config configs/collab_sdxl_turbo.py --out runs/collab_turbo/samples.npz \
        --config.oracle.model=path/to/PickScore_v1 --config.oracle.tokenizer=path/to/CLIP-ViT-H-14
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "collab_lcm_sdxl")
    # SDXL-Turbo as published: trailing Euler ancestral, no guidance, 512 px
    c.student.update(pipeline="sdxl-turbo", steps=2, guidance_scale=0.0)
    c.teacher.update(pipeline="sdxl-refiner", steps=4, guidance_scale=5.0, strength=0.3)
    c.sample.size = (512, 512)
    return c
