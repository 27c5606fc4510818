"""A small digits teacher for T-Stitch: the large teacher's recipe (configs/digits_teacher.py) with
4x4 patches (4 tokens instead of 16) and 2 blocks instead of 4: about 10x cheaper per call. Coarse
patches suit the steps T-Stitch gives it, the early, noisy ones that settle the global shape.

    jdistill train --config configs/digits_teacher_small.py --workdir runs/digits_teacher_small
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "digits_teacher")
    c.model.patch_size = 4
    c.model.depth = 2
    return c
