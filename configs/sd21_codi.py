"""CoDi on Stable Diffusion 2.1 (768 px, v-prediction): configs/sd15_codi.py with the SD2.1 pipeline.

    jdistill distill --config configs/sd21_codi.py --workdir runs/sd21_codi
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location(
        "sd15_codi", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15_codi.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.teacher.pipeline = "stable-diffusion-2-1"
    c.data.resolution = 768
    return c
