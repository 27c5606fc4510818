"""LCM of Stable Diffusion 2.1 (768 px, v-prediction): configs/sd15_lcm.py with the SD2.1 pipeline as
teacher; the schedule and prediction type come from its scheduler config.

    jdistill distill --config configs/sd21_lcm.py --workdir runs/sd21_lcm
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "sd15_lcm")
    c.teacher.pipeline = "stable-diffusion-2-1"
    c.data.resolution = 768
    return c
