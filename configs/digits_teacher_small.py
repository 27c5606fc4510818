"""A small digits teacher for T-Stitch: the large teacher's recipe (configs/digits_teacher.py) at
width 32 and depth 2 (50k params vs 1.27M), about 8x cheaper per call. T-Stitch gives it the early, noisy steps.

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
    c.model.hidden_size = 32
    c.model.depth = 2
    c.model.num_heads = 2
    return c
