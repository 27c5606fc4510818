"""CoDi on Stable Diffusion 2.1 (768 px, v-prediction): configs/sd15_codi.py with the SD2.1 pipeline.

    jdistill distill --config configs/sd21_codi.py --workdir runs/sd21_codi
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "sd15_codi")
    c.teacher.pipeline = "stable-diffusion-2-1"
    c.data.resolution = 768
    return c
