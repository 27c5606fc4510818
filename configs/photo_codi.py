"""CoDi on photographs: 4x super-resolution (8x8 -> 32x32) of photo_patches crops from the
unconditional photo prior (configs/photo_teacher.py), with the same baselines as digits.

    jdistill distill --config configs/photo_codi.py --workdir runs/photo_codi_sr4
    jdistill codi-table --workdir runs/photo_codi_sr4 --out runs/codi_table
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location(
        "digits_codi", os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_codi.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.teacher = dict(workdir="runs/photo_teacher", config="configs/photo_teacher.py")
    c.data = dict(name="photo_patches/32", batch_size=32, data_dir=None)
    c.condition = dict(kind="sr4")
    return c
