"""`jdistill plan` for the text-to-image recipes (LCM and CoDi on SD1.5, LADD on SD3, adaptive
collaboration on SDXL-Turbo / the SDXL refiner) at one block and tiny widths on 8 CPU devices: each
compiles, and its parameter / optimizer / average / frozen bytes equal a count of the network's
leaves (the published config's network with the reduced fields, built abstractly)."""

import os

import jax
import numpy as np
import pytest
from cli_helpers import REPO
from test_plan import derived_config

from jdistill.plan import run as plan_run
from jdistill.plan.steps import preset_denoiser

TINY_UNET = """
c.model = dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
               up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, sample_size=8)
"""
COUNTERS = 3 * 4  # Adam's two int32 step counters and the part's update counter


def elements(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def plan_steps(tmp_path, shipped, body, mesh="data=8"):
    config = derived_config(tmp_path, os.path.join(REPO, "configs", shipped), body)
    out = plan_run.plan(config, meshes=[mesh], target="v5p", out_dir=str(tmp_path / "plan"), progress=False)
    return {s["name"]: s for s in out["runs"][0]["steps"]}


def test_plan_sd3_ladd_one_block(tmp_path):
    """LADD on SD3-medium at its width with one block (the heads on block 0), data=8: the student, its
    EMA and the frozen teacher are the network (replicated), Adam's state covers student and heads."""
    steps = plan_steps(tmp_path, "sd3_ladd.py", """
        c.model = dict(num_layers=1, sample_size=16)
        c.discriminator.blocks = (0,)
        c.data.batch_size = 16
        """)
    (step,) = steps.values()
    net = elements(preset_denoiser("sd3-medium", num_layers=1, sample_size=16)[0].params)
    trained = net - 192 * 192 * 1536  # the fixed position table (pos_embed_max_size 192) has no EMA / moments
    b = step["bytes"]
    assert b["frozen"] == 4 * net and b["averages"] == 4 * trained
    heads = step["parts"]["discriminator"]["params"]
    assert step["parts"]["student"]["params"] == 4 * net and b["params"] == 4 * net + heads
    assert b["optimizer"] == 2 * (4 * trained + heads) + 2 * COUNTERS
    assert step["fit"]["v5p"]["fits"]
