"""CoDi on SDXL base 1.0 (eps, 1024 px): configs/sd15_codi.py with SDXL's pipeline.

The conditional model is SDXL's UNet (with LCM's w embedding) plus a ControlNet initialised from
its encoder (diffusers' ``ControlNetModel.from_unet``, SDXL's "text_time" embedding included: pooled
text and the six time ids reach the ControlNet as they reach the UNet); SDXL's time ids are the
fixed 1024 x 1024, no crop. The UNet (2.6B params), the ControlNet (1.25B), the target average
and AdamW's moments are about 60 GB in fp32, so the state is sharded over ``fsdp`` and every UNet
block is rematerialised in the backward pass, as configs/sd3_ladd.py does (the ControlNet has no
remat option yet; SDXL LCM's step, without the ControlNet and without remat, holds 57 GiB of
activations a device). Its published-size CoDi step on 8x H100 peaks at 46 GiB a device and fits
(docs/pod-scale.md); the reduced-size plan and a tiny training run are tested.

    jdistill distill --config configs/sdxl_codi.py --workdir runs/sdxl_codi
    jdistill sample --workdir runs/sdxl_codi/codi --condition lowres.npz --steps 4
"""

from jdistill.config import sibling_config


def get_config():
    c = sibling_config(__file__, "sd15_codi")
    c.teacher.pipeline = "sdxl"
    c.data.resolution = 1024
    c.mesh.fsdp = 4
    # how the pretrained UNet (and the ControlNet copied from it) runs: see jdistill.recipes.tasks.EXECUTION_FIELDS
    c.model = dict(remat="full")
    return c
