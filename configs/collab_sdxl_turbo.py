"""Adaptive collaboration, the paper's second recipe: SDXL-Turbo (2 steps) samples, an oracle scores,
the SDXL refiner (text_encoder_2 alone, aesthetic-score time ids) refines the lowest-scoring half
with img2img at strength 0.3 for 4 steps (Starodubcev et al., CVPR 2024). The rest (oracle, k,
calibration, sampling options) is configs/collab_lcm_sdxl.py's.

    jdistill sample --config configs/collab_sdxl_turbo.py --out runs/collab_turbo/samples.npz \
        --config.oracle.model=path/to/PickScore_v1 --config.oracle.tokenizer=path/to/CLIP-ViT-H-14
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location(
        "collab_lcm_sdxl", os.path.join(os.path.dirname(os.path.abspath(__file__)), "collab_lcm_sdxl.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    # SDXL-Turbo as published: trailing Euler ancestral, no guidance, 512 px
    c.student.update(pipeline="sdxl-turbo", steps=2, guidance_scale=0.0)
    c.teacher.update(pipeline="sdxl-refiner", steps=4, guidance_scale=5.0, strength=0.3)
    c.sample.size = (512, 512)
    return c
