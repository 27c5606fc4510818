"""`jdistill plan` for the text-to-image recipes (LCM and CoDi / PE-CoDi on SD1.5, LADD on SD3,
adaptive collaboration on SDXL-Turbo / the SDXL refiner) at tiny widths on 8 CPU devices (data=8:
every leaf replicated, so a device holds whole trees): each compiles, and its parameter / optimizer
/ average / frozen / batch bytes equal a count of the networks' abstract param trees (the published
config's network with the reduced fields) and of the inputs. The UNets keep every block type of the
published ones (cross-attention and plain down / up blocks, the cross-attention mid block) at two
levels of 32 channels."""

import os

import jax
import numpy as np
import pytest
from cli_helpers import REPO
from test_plan import derived_config

from jdistill import config as config_lib
from jdistill.diffusion.schedules import DiscreteVP
from jdistill.plan import run as plan_run
from jdistill.plan.steps import module_params, preset_denoiser

# SD1.5's block types (down: cross-attention then plain; up: plain then cross-attention) at two levels
SD15_TINY = dict(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, sample_size=8)
# SDXL's (base and refiner: plain down first, plain up last)
SDXL_TINY = dict(block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 transformer_layers_per_block=1, attention_head_dim=4)
COUNTERS = 3 * 4  # Adam's two int32 step counters and the part's update counter
W_EMBEDDING = 256 * 32  # LCM's cond_proj: w embedding (256) -> the time embedding's input (first block width), no bias


def elements(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def plan_steps(tmp_path, shipped, body, mesh="data=8"):
    config = derived_config(tmp_path, os.path.join(REPO, "configs", shipped), body)
    out = plan_run.plan(config, meshes=[mesh], target="v5p", out_dir=str(tmp_path / "plan"), progress=False)
    return {s["name"]: s for s in out["runs"][0]["steps"]}, config


def assert_arguments_add_up(step):
    """Every byte by kind is an argument XLA counts, or one jit dropped as never read (held all the same)."""
    assert sum(step["bytes"].values()) == step["memory"]["argument"] + step["memory"]["unread"]
    assert step["memory"]["unread"] == sum(step["unread"].values())


def test_plan_sd3_ladd_one_block(tmp_path):
    """LADD on SD3-medium at its width with one block (the heads on block 0), data=8: the student, its
    EMA and the frozen teacher are the network (replicated), Adam's state covers student and heads.
    The heads read the teacher's block-0 image tokens, so the teacher's output layers and that last
    block's context query projection are never read: jit drops them from the program."""
    steps, _ = plan_steps(tmp_path, "sd3_ladd.py", """
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
    d = 1536
    unread = {"[1]['norm_out']['linear']['kernel']": d * 2 * d, "[1]['norm_out']['linear']['bias']": 2 * d,
              "[1]['proj_out']['kernel']": d * 2 * 2 * 16, "[1]['proj_out']['bias']": 2 * 2 * 16,
              "[1]['transformer_blocks_0']['attn']['add_q_proj']['kernel']": d * d,
              "[1]['transformer_blocks_0']['attn']['add_q_proj']['bias']": d}
    assert step["unread"] == {k: 4 * n for k, n in unread.items()}  # [1]: the frozen tree, the step's 2nd argument
    assert_arguments_add_up(step)
    assert step["memory"]["peak"] == sum(step["memory"][k] for k in ("argument", "unread", "output", "temp",
                                                                     "generated_code")) - step["memory"]["alias"]
    assert step["fit"]["v5p"]["fits"]
    assert set(step["options"]) == {"dtype", "remat"}  # what the advice may name (no param_dtype: a pipeline's)


def test_plan_sets_remat_and_compute_dtype_as_training_does():
    """The model section's execution fields go on the planned network as training sets them on the
    pipeline's (bf16 compute, params still float32 as loaded); its other fields size the network."""
    from jdistill.recipes import tasks

    cfg = config_lib.load_config(os.path.join(REPO, "configs", "sd3_ladd.py"), [
        "--config.model.num_layers=1", "--config.model.dtype=bfloat16", "--config.model.remat=full"])
    teacher = tasks.plan_text_task(cfg).teacher
    assert teacher.module.num_layers == 1 and teacher.module.remat == "full"
    assert teacher.module.dtype == jax.numpy.bfloat16
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(teacher.params)} == {np.dtype("float32")}


def test_plan_advises_only_settings_training_accepts_on_a_pipeline():
    """A pretrained pipeline's network takes only the execution options (remat, compute dtype), so the
    plan's advice for its recipes names nothing else: SD3.5 Large LADD over 8 H100s was advised
    ``model.param_dtype=bfloat16``, which training on the pipeline refuses by name. A recipe that
    builds its own network keeps the bf16-params advice."""
    from jdistill.errors import InvalidArgument
    from jdistill.recipes import common, tasks

    def sd3(*overrides):
        return config_lib.load_config(os.path.join(REPO, "configs", "sd3_ladd.py"),
                                      ["--config.model.num_layers=1", *overrides])

    assert set(common.plan_settings(sd3())) == {"dtype", "remat"}
    den = preset_denoiser("sd3-medium", num_layers=1, sample_size=16)[0]
    for key, value in (("dtype", "bfloat16"), ("remat", "none")):  # what training sets on the pipeline's network
        tasks.with_model_fields(den, sd3(f"--config.model.{key}={value}"), "the pipeline")
    edited = sd3()  # the advice said "add model.param_dtype=bfloat16 to the config": a key the file lacks
    with edited.unlocked():
        edited.model.param_dtype = "bfloat16"
    with pytest.raises(InvalidArgument, match="model.param_dtype"):
        tasks.with_model_fields(den, edited, "the pipeline")
    own = config_lib.load_config(os.path.join(REPO, "configs", "digits_ladd.py"))
    assert set(common.plan_settings(own)) == {"param_dtype", "dtype", "remat"}


@pytest.mark.slow
def test_plan_sd15_lcm(tmp_path):
    """LCM on SD1.5 (tiny UNet, every block type): the frozen teacher is the network, the student and
    its target average the network with LCM's w embedding, Adam's two moments the student's."""
    steps, _ = plan_steps(tmp_path, "sd15_lcm.py", f"""
        c.model = {SD15_TINY!r}
        c.data.batch_size = 16
        """)
    (step,) = steps.values()
    net = elements(preset_denoiser("stable-diffusion-v1-5", **SD15_TINY)[0].params)
    student = net + W_EMBEDDING
    b = step["bytes"]
    assert b["frozen"] == 4 * net and b["params"] == 4 * student and b["averages"] == 4 * student
    assert b["optimizer"] == 2 * 4 * student + COUNTERS
    latents, text = 16 * 8 * 8 * 4, 16 * 77 * 768  # the batch: latents and the prompts' CLIP states, 2 rows a device
    assert b["batch"] == 4 * (latents + text) // 8
    assert_arguments_add_up(step)
    assert step["memory"]["unread"] == 0
    assert step["fit"]["v5p"]["fits"]


def plan_codi(tmp_path, shipped, preset, tiny, model_section):
    """The CoDi and PE-CoDi plans of ``shipped`` with a tiny UNet (``tiny`` fields of ``preset``) and
    the ControlNet adapter: CoDi trains backbone and adapter (Adam and the target average over both);
    PE-CoDi the same program with the backbone frozen: its optimizer state and average cover only
    the adapter's params. Returns the conditional model's module and params."""
    steps, config = plan_steps(tmp_path, shipped, f"""
        {model_section}
        c.data.batch_size = 16
        c.data.resolution = 64
        """)
    from jdistill.recipes import conditional

    module = conditional.plan_task(config_lib.load_config(config)).model.module
    model = module_params(module)
    net = elements(preset_denoiser(preset, **tiny)[0].params)
    backbone, adapter = elements(model["backbone"]), elements(model["adapter"])
    assert backbone == net + W_EMBEDDING and adapter > 0
    both = backbone + adapter
    codi, pe_codi = steps["codi"]["bytes"], steps["pe_codi"]["bytes"]
    assert codi["params"] == pe_codi["params"] == 4 * both and codi["frozen"] == pe_codi["frozen"] == 0
    assert codi["optimizer"] == 2 * 4 * both + COUNTERS and codi["averages"] == 4 * both
    assert pe_codi["optimizer"] == 2 * 4 * adapter + COUNTERS and pe_codi["averages"] == 4 * adapter
    for step in steps.values():
        assert_arguments_add_up(step)
    return module, model


@pytest.mark.slow
def test_plan_sd15_codi_and_pe_codi(tmp_path):
    """CoDi and PE-CoDi on SD1.5 (tiny UNet, every block type, with the ControlNet adapter)."""
    plan_codi(tmp_path, "sd15_codi.py", "stable-diffusion-v1-5", SD15_TINY, f"c.model = {SD15_TINY!r}")


@pytest.mark.slow
def test_plan_sdxl_codi_and_pe_codi(tmp_path):
    """configs/sdxl_codi.py (tiny SDXL UNet with the ControlNet copied from it, the config's remat kept):
    the same byte counts as SD1.5's, the ControlNet's "text_time" embedding included in the adapter."""
    tiny = {**SDXL_TINY, "sample_size": 8}
    module, model = plan_codi(tmp_path, "sdxl_codi.py", "sdxl", tiny, f"c.model.update({tiny!r})")
    assert "add_embedding" in model["adapter"]["controlnet"]  # pooled text and time ids reach the ControlNet
    assert module.backbone.remat == module.adapter.controlnet.remat == "full"


def test_plan_collab_sdxl_turbo(tmp_path):
    """Adaptive collaboration (SDXL-Turbo 2 steps, the SDXL refiner with CFG 5): one sampler step of
    each (tiny UNets, every block type). The refiner takes the pooled text (1280) and 5 time ids (the
    aesthetic score), the base 6 (the target size): the batch bytes say which the plan made."""
    steps, _ = plan_steps(tmp_path, "collab_sdxl_turbo.py", f"""
        c.model = {SDXL_TINY!r}
        c.sample.size = (64, 64)
        c.sample.batch_size = 16
        """)
    assert set(steps) == {"student step", "teacher step"}
    latents = 16 * 8 * 8 * 4
    # both sample on SD's scaled-linear betas (the presets' published scheduler configs, not DDPM's default)
    sd_betas = np.asarray(DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012).alphas_cumprod)
    for name, preset, states, time_ids, passes in (("student step", "sdxl-turbo", 2048, 6, 1),
                                                   ("teacher step", "sdxl-refiner", 1280, 5, 2)):
        step = steps[name]
        den = preset_denoiser(preset, **SDXL_TINY)[0]
        np.testing.assert_array_equal(np.asarray(den.schedule.alphas_cumprod), sd_betas)
        net = elements(den.params)
        assert step["bytes"]["params"] == 4 * net, name
        cond = 16 * (77 * states + 1280 + time_ids)  # prompt states, pooled text, time ids
        # the refiner's CFG reads cond and uncond, Turbo (no guidance) the prompt alone; 2 rows a device
        assert step["bytes"]["batch"] == 4 * (latents + passes * cond) // 8, name
        assert_arguments_add_up(step)
        assert step["fit"]["v5p"]["fits"]


def test_plan_collab_lcm_sdxl_student_takes_guidance_as_its_w_embedding(tmp_path):
    """Adaptive collaboration's first recipe (LCM-SDXL 4 steps, SDXL base img2img with CFG 8): the
    LCM student samples guided in ONE pass, the scale entering as its w embedding (``timestep_cond``),
    as its pipeline runs it; the teacher's CFG runs two. A plan that gave the student CFG would count
    its negative prompt and twice its FLOPs."""
    steps, _ = plan_steps(tmp_path, "collab_lcm_sdxl.py", f"""
        c.model = {SDXL_TINY!r}
        c.sample.size = (64, 64)
        c.sample.batch_size = 16
        """)
    assert set(steps) == {"student step", "teacher step"}
    student, teacher = steps["student step"], steps["teacher step"]
    latents = 16 * 8 * 8 * 4
    cond = 16 * (77 * 2048 + 1280 + 6)  # prompt states, pooled text, SDXL base's 6 time ids
    assert "guidance 8 as an input (one pass)" in student["description"]
    assert "CFG 8 (2 passes" in teacher["description"]
    assert student["bytes"]["batch"] == 4 * (latents + cond + 16 * 256) // 8  # + the w embedding, no uncond
    assert teacher["bytes"]["batch"] == 4 * (latents + 2 * cond) // 8
    lcm = preset_denoiser("lcm-sdxl", **SDXL_TINY)[0]
    assert student["bytes"]["params"] == 4 * elements(lcm.params)
    assert teacher["bytes"]["params"] == student["bytes"]["params"] - 4 * W_EMBEDDING
    for step in (student, teacher):
        assert_arguments_add_up(step)
    # one pass against two of the same network (the w embedding's projection is a rounding error)
    assert 0.45 < student["flops"] / teacher["flops"] < 0.55
