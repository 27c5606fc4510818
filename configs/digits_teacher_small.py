"""A small digits teacher for T-Stitch: the large teacher's recipe (configs/digits_teacher.py) with
4x4 patches (4 tokens instead of 16) and 2 blocks instead of 4: about 10x cheaper per call. Coarse
patches suit the steps T-Stitch gives it, the early, noisy ones that settle the global shape.

    jdistill train --config configs/digits_teacher_small.py --workdir runs/digits_teacher_small
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location(
        "digits_teacher", os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_teacher.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.model.patch_size = 4
    c.model.depth = 2
    return c
