"""LADD of Stable Diffusion 3.5 Large: configs/sd3_ladd.py with the 38-block SD3.5 Large MMDiT
(RMS q/k norm) as teacher and student, the heads on four of its blocks.

    jdistill distill --config configs/sd35_large_ladd.py --workdir runs/sd35_large_ladd
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "sd3_ladd")
    c.teacher.pipeline = "stable-diffusion-3.5-large"
    c.synth.guidance_scale = 3.5  # the SD3.5 Large model card's CFG
    c.ladd.distill_guidance = 3.5
    c.discriminator.blocks = (8, 17, 26, 35)
    c.model.num_layers = 38  # sd3_ladd's 24 is SD3 Medium's
    return c
