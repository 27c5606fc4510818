"""CoDi on photographs: 4x super-resolution (8x8 -> 32x32) of photo_patches crops from the
unconditional photo prior (configs/photo_teacher.py), with the same baselines as digits.

    jdistill distill --config configs/photo_codi.py --workdir runs/photo_codi_sr4
    jdistill codi-table --workdir runs/photo_codi_sr4 --out runs/codi_table
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "digits_codi")
    c.teacher = dict(workdir="runs/photo_teacher", config="configs/photo_teacher.py")
    c.data = dict(name="photo_patches/32", batch_size=32, data_dir=None)
    c.condition = dict(kind="sr4")
    # the skip grid and sampler its table in docs/codi.md was measured with (LCM's 50 steps; CoDi's
    # deterministic sampler on LCMScheduler's picks): the digits config's choices were made on digits
    # and are not measured on photographs
    c.codi.num_steps = 50
    c.sample = dict(steps=4, solver="codi", spacing="lcm")
    return c
