"""LCM of Stable Diffusion 2.1 (768 px, v-prediction): configs/sd15_lcm.py with the SD2.1 pipeline as
teacher; the schedule and prediction type come from its scheduler config.

    jdistill distill --config configs/sd21_lcm.py --workdir runs/sd21_lcm
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location(
        "sd15_lcm", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15_lcm.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.teacher.pipeline = "stable-diffusion-2-1"
    c.data.resolution = 768
    return c
