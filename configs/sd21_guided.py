"""Guided distillation of Stable Diffusion 2.1 (768 px, v-prediction): configs/sd15_guided.py with
the SD2.1 pipeline as teacher. The prediction type and schedule come from the pipeline's own
scheduler config.

    jdistill distill --config configs/sd21_guided.py --workdir runs/sd21_guided
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "sd15_guided")
    c.teacher.pipeline = "stable-diffusion-2-1"
    c.data.resolution = 768
    return c
