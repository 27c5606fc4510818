"""Latent consistency distillation of SDXL base 1.0 (LCM-SDXL, Luo et al.; diffusers'
train_lcm_distill_sdxl_wds.py settings): configs/sd15_lcm.py with SDXL's pipeline at 1024 px.

The student is SDXL's UNet with ``time_cond_proj_dim`` 256 (``cond_proj`` zero-initialised, so it
starts as the teacher); the teacher's CFG scale g ~ U[4, 16] (the script's w in [3, 15], w = g - 1);
no weight decay; SDXL's time ids are the fixed 1024 x 1024, no crop (the script's
``--use_fix_crop_and_size``). The 2.6B-parameter student, its target, its Adam moments and the
frozen teacher are about 51 GB in fp32, so the state is sharded over ``fsdp`` (docs/pod-scale.md
plans it on v5p and H100 meshes).

    jdistill distill --config configs/sdxl_lcm.py --workdir runs/sdxl_lcm
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "sd15_lcm")
    c.teacher.pipeline = "sdxl"
    c.data.resolution = 1024
    c.lcm.scale_range = (4.0, 16.0)
    c.optim.weight_decay = 0.0
    c.mesh.fsdp = 4
    return c
