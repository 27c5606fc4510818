"""The public distilled students as presets: published configs, published samplers, and each
kind of preset loaded from a tiny local copy built with its published config's shape.

* Every published config a preset carries builds its jdistill module (LCM's w-embedding
  width, SDXL's text_time ids, SD3.5's q/k norms included).
* Every published sampler is a diffusers scheduler that builds from the base pipeline's
  config with the recorded options and gives the step counts (and the timesteps) its
  authors publish (checked against diffusers' own schedulers, not jdistill's solvers).
* Each kind of preset (a pipeline folder, a UNet model folder, a bare UNet file in diffusers'
  layout, a LoRA) is built tiny with its published config scaled down (widths, depths; every
  structural option kept), put where a local copy is looked for, and loaded by name through
  ``load_pretrained`` and ``TextToImage.from_preset``: the network equals diffusers' on the same
  weights (<= 1e-4 relative, with LCM's timestep_cond and SDXL's time ids), and the pipeline
  gets the preset's scheduler.

Every published sampler plans onto the timesteps diffusers' scheduler steps through (TCD,
Hyper-SD's one-step sampler, included). Each kind of student is sampled as published and equals
the diffusers pipeline's final latents for the same initial latents (1e-4; 2e-4 where LCM's w
embedding enters):

* LCM Dreamshaper v7 (pipeline), LCM-SDXL (UNet folder), LCM-LoRA SDXL and LCM-LoRA SD 1.5: 4 LCM
  steps, and SDXL-Turbo: 4 trailing Euler ancestral steps. Both schedulers draw fresh noise at
  each step: diffusers' scheduler is fed the noise jdistill draws (step i's from fold_in(key, i)).
* Hyper-SDXL 1-step UNet: one LCMScheduler step at the published timestep 800.
* Hyper-SD15 2-step LoRA (trailing DDIM) and 1-step LoRA (TCD, eta 1, at timestep 800) on a tiny
  SD 1.5 pipeline (PNDM base scheduler config, all four block types).
* Hyper-SD3's 4-step CFG LoRA: fused at 1/8, 4 flow Euler steps at guidance 3; diffusers'
  ``fuse_lora(lora_scale=0.125)`` and ``set_adapters(..., [0.125])`` agree.

LCM-SDXL, the Hyper-SDXL UNet and the Lightning LoRA sample in the slow suite (a whole SDXL
pipeline each); the default suite loads them.
* SDXL-Lightning UNet and LoRA (4 steps, trailing Euler), Hyper-SDXL 4-step LoRA (trailing DDIM),
  SD3.5 Large Turbo (4 flow Euler steps): the whole trajectory.
"""

import dataclasses
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
from cli_helpers import run_cli
from PIL import Image
from test_lora import peft_config
from test_schedulers_parity import _RANDN_MODULES as RANDN_MODULES
from test_text_to_image import clip_tower, t5_tokenizer, vae, write_clip_tokenizer
from test_unet_cond import randomize_

from jdistill import cli
from jdistill import images as images_lib
from jdistill.convert import lora, pretrained, presets
from jdistill.models import layers
from jdistill.pipelines import TextToImage, scheduling
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
STUDENTS = [p for p in presets.PRESETS.values() if p.sampler is not None]


# ------------------------------------------------------------------------------- published data


def test_published_configs_build_their_modules():
    for preset in presets.PRESETS.values():
        for name, config in preset.configs.items():
            if name == "scheduler":
                continue
            # what `jdistill plan` builds: the module of the published config (a bare original DiT file's too)
            module = pretrained.published_module(preset.name, name)
            assert module is not None, (preset.name, name)
    assert presets.get("lcm-dreamshaper-v7").configs["unet"]["time_cond_proj_dim"] == 256
    assert presets.get("lcm-sdxl").file_config is None  # a folder: its config.json describes it
    lightning = presets.get("sdxl-lightning-4step-unet")
    assert lightning.file_config["addition_embed_type"] == "text_time" and lightning.file_config["time_cond_proj_dim"] is None
    assert presets.get("sd35-large-turbo").configs["transformer"]["qk_norm"] == "rms_norm"


# the base pipelines' published scheduler configs the students' samplers start from
BASE_SCHEDULERS = {
    "sd15": {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None, "clip_sample": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False},
    "sd3-medium": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
}
# what the cards' settings give (a few checked value by value)
PUBLISHED_TIMESTEPS = {
    ("sdxl-lightning-4step-unet", 4): [999, 749, 499, 249],
    ("sdxl-lightning-4step-lora", 4): [999, 749, 499, 249],
    ("sdxl-lightning-1step-unet", 1): [999],
    ("sdxl-turbo", 1): [999],
    ("lcm-dreamshaper-v7", 4): [999, 759, 499, 259],
    ("lcm-lora-sdxl", 4): [999, 759, 499, 259],
    ("hyper-sdxl-4step-lora", 4): [999, 749, 499, 249],
    ("hyper-sdxl-1step-unet", 1): [800],
    ("hyper-sd15-1step-lora", 1): [800],
}


@pytest.mark.parametrize("preset", STUDENTS, ids=lambda p: p.name)
def test_published_samplers_are_diffusers_schedulers(preset):
    s = preset.sampler
    base = preset.configs.get("scheduler") or BASE_SCHEDULERS.get(preset.base) or \
        BASE_SCHEDULERS["sd3-medium" if "sd3" in preset.name else "sdxl"]
    cls = getattr(diffusers, s.scheduler)
    scheduler = cls.from_config(s.scheduler_config(base))
    assert type(scheduler).__name__ == s.scheduler
    for key, value in s.options.items():
        assert scheduler.config[key] == value, (preset.name, key)
    assert s.steps and (s.guidance_scale == 0.0) == (preset.name.startswith(("sdxl-turbo", "sdxl-lightning", "sd35")) or
                                                      ("hyper" in preset.name and "cfg" not in preset.name))
    for n in s.steps:
        if s.timesteps is not None:
            scheduler.set_timesteps(timesteps=list(s.timesteps))
        else:
            scheduler.set_timesteps(n)
        ts = [int(t) for t in scheduler.timesteps]
        assert len(ts) == n and ts == sorted(ts, reverse=True), (preset.name, ts)
        if (preset.name, n) in PUBLISHED_TIMESTEPS:
            assert ts == PUBLISHED_TIMESTEPS[preset.name, n]
        config = s.scheduler_config(base)
        # the grid jdistill samples the preset on is the one diffusers' scheduler steps through
        grid_t = np.asarray(scheduling.plan(config, n, timesteps=s.timesteps).grid.t, np.float64)
        scale = 1000.0 if scheduling.is_flow(config) else 1.0  # flow grids run over t in [0, 1]
        np.testing.assert_allclose(grid_t * scale, scheduler.timesteps.numpy(), rtol=1e-6, err_msg=preset.name)
    if s.lora_scale is not None:
        assert preset.lora and 0 < s.lora_scale <= 1


def test_student_presets_are_well_formed():
    for p in STUDENTS:
        assert p.repo_id and p.description and p.default_component
        if p.base is not None:
            base = presets.get(p.base)
            assert p.replaces in (base.expect or {}) or p.replaces == base.default_component, p.name
        if p.lora:
            assert p.is_file and p.base and p.file_config is None
        if p.is_file and not p.lora:
            assert p.file_config is not None, p.name
    with pytest.raises(ValueError, match="is a LoRA for 'sd15', not a model to convert"):
        pretrained.convert("lcm-lora-sdv1-5", "/nonexistent/out")


# ------------------------------------------------------------------------------- scaled down


def tiny_unet_config(published, seed_width=16):
    """The published UNet config with every width and depth scaled down, every option kept."""
    cfg = {k: v for k, v in published.items() if not k.startswith("_")}
    n = len(cfg["block_out_channels"])
    cfg.update(block_out_channels=[seed_width * (i + 1) for i in range(n)], norm_num_groups=8, layers_per_block=1,
               sample_size=8, cross_attention_dim=32 if cfg.get("addition_embed_type") is None else 48)
    cfg["attention_head_dim"] = [2] * n if isinstance(cfg["attention_head_dim"], list) else 2
    depth = cfg.get("transformer_layers_per_block", 1)
    cfg["transformer_layers_per_block"] = [min(d, 2) for d in depth] if isinstance(depth, list) else 1
    if cfg.get("addition_embed_type") == "text_time":
        cfg.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    return cfg


def tiny_mmdit_config(published):
    cfg = {k: v for k, v in published.items() if not k.startswith("_")}
    cfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
               joint_attention_dim=48, pooled_projection_dim=16 + 24, pos_embed_max_size=8, sample_size=8,
               in_channels=4, out_channels=4)
    return cfg


def sdxl_pipeline(folder, unet_config, scheduler, seed=0):
    tok1, n1 = write_clip_tokenizer(folder.parent / f"{folder.name}-tok1")
    tok2, n2 = write_clip_tokenizer(folder.parent / f"{folder.name}-tok2", pad="!")
    torch.manual_seed(seed)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(seed + 1), text_encoder=clip_tower(n1, seed + 2), tokenizer=tok1,
        text_encoder_2=clip_tower(n2, seed + 3, 16, "gelu", 16), tokenizer_2=tok2,
        unet=randomize_(diffusers.UNet2DConditionModel(**unet_config), seed=seed + 4).eval(), scheduler=scheduler,
        add_watermarker=False)
    pipe.save_pretrained(folder)
    return pipe


def sd15_pipeline(folder, unet_config, scheduler, seed=0, cls=diffusers.StableDiffusionPipeline):
    """A tiny SD 1.5-layout pipeline (one CLIP tower, no safety checker) saved to ``folder``."""
    tok, n = write_clip_tokenizer(folder.parent / f"{folder.name}-tok")
    torch.manual_seed(seed)
    pipe = cls(vae=vae(seed + 1), text_encoder=clip_tower(n, seed + 2), tokenizer=tok,
               unet=randomize_(diffusers.UNet2DConditionModel(**unet_config), seed=seed + 3).eval(),
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def unet_inputs(module, timestep_cond=None, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, 8, 8, module.in_channels)).astype(np.float32)
    t = np.array([999.0, 259.0], np.float32)
    ctx = rng.standard_normal((2, 5, module.context_dim)).astype(np.float32)
    kw, tkw = {}, {}
    if module.addition_embed_type == "text_time":
        added = {"text_embeds": rng.standard_normal((2, 16)).astype(np.float32),
                 "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]] * 2, np.float32)}
        kw["added_cond_kwargs"] = {k: jnp.asarray(v) for k, v in added.items()}
        tkw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    if timestep_cond is not None:
        kw["timestep_cond"] = jnp.asarray(timestep_cond)
        tkw["timestep_cond"] = torch.from_numpy(np.array(timestep_cond))
    return (z, t, ctx), kw, tkw


def assert_unet_equal(module, params, torch_unet, timestep_cond=None, what=""):
    (z, t, ctx), kw, tkw = unet_inputs(module, timestep_cond)
    ours = module.apply({"params": params}, jnp.asarray(z), jnp.asarray(t), jnp.asarray(ctx), **kw)
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(nchw(z)), torch.from_numpy(t), torch.from_numpy(ctx), **tkw).sample
    assert_close(ours, nhwc(ref.numpy()), TOL, what)


@pytest.fixture
def models(tmp_path, monkeypatch):
    """An empty models folder searched for presets (and an empty hub cache), and a function
    registering a tiny stand-in for a preset (its expected values those of the tiny copy)."""
    root = tmp_path / "models"
    root.mkdir()
    monkeypatch.setenv("JDISTILL_MODELS", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def register(name, **changes):
        tiny = dataclasses.replace(presets.get(name), **changes)
        monkeypatch.setitem(presets.PRESETS, name, tiny)
        return tiny

    return root, register


@pytest.fixture
def tiny_sdxl(models, tmp_path):
    """A tiny SDXL base pipeline standing in for the "sdxl" preset."""
    root, register = models
    config = tiny_unet_config(presets.SDXL_UNET)
    pipe = sdxl_pipeline(root / "sdxl", config, diffusers.EulerDiscreteScheduler(steps_offset=1,
                                                                                  timestep_spacing="leading"))
    register("sdxl", expect={"unet": {"cross_attention_dim": 48, "addition_time_embed_dim": 8}})
    return pipe, config


@pytest.mark.slow  # 55 s: the LCM sampler is default-tested on LCM-LoRA's pipeline and against LCMScheduler
def test_lcm_pipeline_preset(models, tmp_path, monkeypatch):
    """LCM Dreamshaper v7 (a pipeline with LCMScheduler): the w-conditioned UNet with LCM's
    guidance embedding as timestep_cond equals diffusers' LatentConsistencyModelPipeline's."""
    root, register = models
    config = tiny_unet_config(presets.LCM_SD15_UNET)
    pipe = sd15_pipeline(root / "lcm-dreamshaper-v7", config, diffusers.LCMScheduler.from_config(presets.LCM_SCHEDULER),
                         cls=diffusers.LatentConsistencyModelPipeline)
    preset = register("lcm-dreamshaper-v7", configs={**presets.get("lcm-dreamshaper-v7").configs, "unet": config},
                      expect={"unet": {"time_cond_proj_dim": 256, "cross_attention_dim": 32},
                              "scheduler": {"original_inference_steps": 50}})
    t2i = TextToImage.from_preset("lcm-dreamshaper-v7", cache_dir=tmp_path / "cache")
    assert t2i.network.time_cond_proj_dim == 256 and t2i.scheduler_config["_class_name"] == "LCMScheduler"
    w = preset.sampler.guidance_scale
    ours = layers.guidance_scale_embedding(jnp.full((2,), w), 256)
    ref = pipe.get_guidance_scale_embedding(torch.full((2,), w - 1), embedding_dim=256)
    # phases up to 7000 rad: one float32 ulp of a frequency (XLA's and torch's exp differ by one) is 5e-4
    assert_close(ours, ref.numpy(), 1e-3, "LCM guidance embedding")
    small = pipe.get_guidance_scale_embedding(torch.full((1,), 0.5), embedding_dim=256)
    assert_close(layers.guidance_scale_embedding(jnp.full((1,), 1.5), 256), small.numpy(), 1e-4, "at w = 0.5")
    assert_unet_equal(t2i.network, t2i.params["network"], pipe.unet, np.asarray(ours), "LCM UNet with timestep_cond")
    # the published 4 LCM steps, diffusers fed jdistill's fresh noise between them
    steps = preset.sampler.steps[0]
    size = config["sample_size"]
    z = np.random.default_rng(0).standard_normal((1, size, size, config["in_channels"])).astype(np.float32)
    pixels = size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    feed_step_noise(monkeypatch, pipe, z.shape, steps)
    with torch.no_grad():
        ref = pipe(prompt=["a photo of a cat"], num_inference_steps=steps, guidance_scale=w, height=pixels,
                   width=pixels, latents=torch.from_numpy(nchw(z)), output_type="latent").images
    ours = t2i(["a photo of a cat"], num_steps=steps, guidance_scale=w, latents=z, output_type="latent")
    assert_close(ours, nhwc(ref.numpy()), 2e-4, f"LCM pipeline, {steps} steps")


def test_sdxl_turbo_pipeline_preset(models, tmp_path, monkeypatch, capsys, request):
    """SDXL-Turbo: its pipeline folder by preset name, 4 steps equal to diffusers'; and `jdistill
    sample` writing those images from the folder (a real process) and from the preset."""
    root, register = models
    config = tiny_unet_config(presets.SDXL_TURBO_UNET)
    pipe = sdxl_pipeline(root / "sdxl-turbo", config,
                         diffusers.EulerAncestralDiscreteScheduler.from_config(presets.SDXL_TURBO_SCHEDULER))
    register("sdxl-turbo", expect={"unet": {"cross_attention_dim": 48}, "scheduler": {"timestep_spacing": "trailing"}})
    t2i = TextToImage.from_preset("sdxl-turbo", cache_dir=tmp_path / "cache")
    # the real command, from the folder (the preset is a tiny stand-in only this process registers),
    # running beside the checks below; it finds the folder's models converted in the cache
    png = tmp_path / "cli" / "turbo.png"
    cli_run = run_cli(["sample", "--pretrained", str(root / "sdxl-turbo"), "--prompt", *PROMPTS, "--steps", "4",
                       "--guidance", "0", "--seed", "3", "--out", str(png)],
                      extra_env={"JDISTILL_CACHE": str(tmp_path / "cache")})
    request.addfinalizer(lambda: cli_run.poll() is None and cli_run.kill())
    assert t2i.family == "sdxl" and t2i.scheduler_config["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert t2i.scheduler_config["timestep_spacing"] == "trailing"
    assert_unet_equal(t2i.network, t2i.params["network"], pipe.unet, what="SDXL-Turbo UNet with time ids")
    unet = pretrained.load_pretrained("sdxl-turbo", cache_dir=tmp_path / "cache")  # the preset's default component
    assert unet.component == "unet" and unet.module == t2i.network
    # its longest published sampler, 4 trailing Euler ancestral steps, diffusers fed jdistill's step
    # noise; the initial latents are those `seed` draws, so the commands below give these images
    g, steps, seed = presets.get("sdxl-turbo").sampler.guidance_scale, 4, 3
    key_noise, _ = jax.random.split(jax.random.key(seed))  # as TextToImage.generate splits its seed
    z = np.asarray(jax.random.normal(key_noise, (2, 8, 8, 4), jnp.float32))
    out = t2i.generate(PROMPTS, num_steps=steps, guidance_scale=g, seed=seed)
    feed_step_noise(monkeypatch, pipe, z.shape, steps, seed=seed)
    assert_close(out.latents, diffusers_latents(pipe, z, steps, guidance_scale=g), TOL,
                 "SDXL-Turbo, 4 Euler ancestral steps")
    expected = images_lib.to_uint8(np.asarray(out.images))

    monkeypatch.setenv("JDISTILL_CACHE", str(tmp_path / "cache"))
    npz = tmp_path / "cli" / "turbo.npz"
    assert cli.main(["sample", "--config", "sdxl-turbo", "--prompt", *PROMPTS, "--steps", "4", "--seed", "3",
                     "--out", str(npz)]) == 0
    assert "sdxl-turbo: 4 steps of euler_ancestral, guidance 0" in capsys.readouterr().out  # the published g
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["images"], expected)
        assert f["prompts"].tolist() == PROMPTS
    assert cli.main(["sample", "--pretrained", "sdxl-turbo", "--out", str(npz)]) == 2
    assert capsys.readouterr().err.strip() == "jdistill sample: error: sampling sdxl-turbo needs --prompt"
    assert cli.main(["sample", "--pretrained", str(tmp_path / "nothing"), "--prompt", "a cat"]) == 2
    assert "is neither a pipeline folder (no model_index.json) nor a preset" in capsys.readouterr().err
    output, _ = cli_run.communicate(timeout=600)
    assert cli_run.returncode == 0, output
    assert "4 steps of euler_ancestral, guidance 0" in output and png.is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(png)), images_lib.grid(expected, upscale=1))


# sampling a whole SDXL pipeline costs a minute here: the default suite loads, the slow one samples too
SAMPLED = pytest.mark.parametrize("sample", [False, pytest.param(True, marks=pytest.mark.slow)],
                                  ids=["loaded", "sampled"])


@SAMPLED
@pytest.mark.parametrize("name", ["hyper-sdxl-1step-unet"])
def test_unet_file_preset(name, sample, tiny_sdxl, models, tmp_path):
    """A bare diffusers-layout UNet file with the published (scaled) SDXL UNet config: converted
    alone, and put into its base pipeline with the preset's scheduler."""
    root, register = models
    base_pipe, config = tiny_sdxl
    student = randomize_(diffusers.UNet2DConditionModel(**config), seed=42).eval()
    preset = presets.get(name)
    (root / name).mkdir()
    safetensors.torch.save_file(student.state_dict(), root / name / preset.filename)
    published = {"_class_name": "UNet2DConditionModel", **config}  # as a config.json says it
    register(name, configs={"unet": published})
    unet = pretrained.load_pretrained(name, cache_dir=tmp_path / "cache")
    assert unet.family == "unet_cond" and unet.config == published
    assert_unet_equal(unet.module, unet.params, student, what=f"{name} UNet")
    t2i = TextToImage.from_preset(name, cache_dir=tmp_path / "cache")
    assert t2i.network == unet.module
    assert t2i.scheduler_config["_class_name"] == preset.sampler.scheduler
    for key, value in preset.sampler.options.items():
        assert t2i.scheduler_config[key] == value
    assert_unet_equal(t2i.network, t2i.params["network"], student, what=f"{name} in its base pipeline")
    if not sample:
        return
    # sampled as published: one LCMScheduler step from unit noise at the published timestep (800)
    s = preset.sampler
    z = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=1, guidance_scale=s.guidance_scale, latents=z, output_type="latent",
               timesteps=list(s.timesteps))
    base_pipe.unet = student
    base_pipe.scheduler = base_scheduler(root, s)
    ref = diffusers_latents(base_pipe, z, 1, guidance_scale=s.guidance_scale, timesteps=list(s.timesteps))
    assert_close(ours, ref, TOL, f"{name}, one {s.scheduler} step at {s.timesteps}")


@SAMPLED
def test_unet_folder_preset(sample, tiny_sdxl, models, tmp_path, monkeypatch):
    """LCM-SDXL: a UNet model folder (config.json + weights), w-conditioned; one LCM step in its
    base pipeline gives diffusers' latents."""
    root, register = models
    config = tiny_unet_config(presets.LCM_SDXL_UNET)
    torch.manual_seed(0)
    student = randomize_(diffusers.UNet2DConditionModel(**config), seed=7).eval()
    student.save_pretrained(root / "lcm-sdxl")
    register("lcm-sdxl", expect={"": {"time_cond_proj_dim": 256, "cross_attention_dim": 48}})
    unet = pretrained.load_pretrained("lcm-sdxl", cache_dir=tmp_path / "cache")
    emb = np.asarray(layers.guidance_scale_embedding(jnp.full((2,), 8.0), 256))
    assert_unet_equal(unet.module, unet.params, student, emb, "LCM-SDXL UNet with timestep_cond")
    register("lcm-sdxl", expect={"": {"time_cond_proj_dim": 512}})
    with pytest.raises(presets.PresetMismatch, match="time_cond_proj_dim is 256, expected 512"):
        pretrained.load_pretrained("lcm-sdxl", cache_dir=tmp_path / "cache")
    if not sample:
        return
    register("lcm-sdxl", expect={})
    # the published 4 steps at w in its base pipeline, diffusers fed jdistill's noise between steps
    base_pipe, _ = tiny_sdxl
    sampler = presets.get("lcm-sdxl").sampler
    steps, w = sampler.steps[0], sampler.guidance_scale
    t2i = TextToImage.from_preset("lcm-sdxl", cache_dir=tmp_path / "cache")
    z = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=w, latents=z, output_type="latent")
    base_pipe.unet = student
    base_pipe.scheduler = base_scheduler(models[0], sampler)
    feed_step_noise(monkeypatch, base_pipe, z.shape, steps)
    # 2e-4: the w embedding's phases (test_lcm_pipeline_preset)
    assert_close(ours, diffusers_latents(base_pipe, z, steps, guidance_scale=w), 2e-4, f"LCM-SDXL, {steps} steps")


def test_lora_preset(tiny_sdxl, models, tmp_path, monkeypatch):
    """LCM-LoRA for SDXL: loading the preset gives the base UNet with the LoRA merged, equal to
    diffusers' fuse_lora; the pipeline gets it and LCMScheduler."""
    root, register = models
    base_pipe, _ = tiny_sdxl
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sdxl" / "unet")
    torch.manual_seed(3)
    unet.add_adapter(peft_config(["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    (root / "lcm-lora-sdxl").mkdir()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(root / "lcm-lora-sdxl",
                                                          unet_lora_layers=peft.get_peft_model_state_dict(unet))
    merged = pretrained.load_pretrained("lcm-lora-sdxl", cache_dir=tmp_path / "cache")
    base = pretrained.load_pretrained("sdxl", cache_dir=tmp_path / "cache")
    factors = lora.read(root / "lcm-lora-sdxl", {"unet": base})["unet"]
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(root / "sdxl")
    theirs.load_lora_weights(root / "lcm-lora-sdxl")
    theirs.fuse_lora(components=["unet"])
    assert_unet_equal(merged.module, merged.params, theirs.unet, what="LCM-LoRA merged into the SDXL UNet")
    t2i = TextToImage.from_preset("lcm-lora-sdxl", cache_dir=tmp_path / "cache")
    assert t2i.scheduler_config["_class_name"] == "LCMScheduler"
    direct = lora.merge(base.params, factors)
    np.testing.assert_array_equal(np.asarray(t2i.params["network"]["conv_in"]["kernel"]),
                                  np.asarray(direct["conv_in"]["kernel"]))
    assert_unet_equal(t2i.network, t2i.params["network"], theirs.unet, what="LCM-LoRA pipeline's UNet")
    # the published 4 steps at guidance 1 (none), diffusers fed jdistill's noise between steps
    sampler = presets.get("lcm-lora-sdxl").sampler
    steps, g = sampler.steps[0], sampler.guidance_scale
    z = np.random.default_rng(6).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=g, latents=z, output_type="latent")
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    feed_step_noise(monkeypatch, theirs, z.shape, steps)
    assert_close(ours, diffusers_latents(theirs, z, steps, guidance_scale=g), TOL, f"LCM-LoRA SDXL, {steps} steps")


@pytest.fixture
def tiny_sd3(models, tmp_path):
    """A tiny SD3.5-Large-shaped pipeline (q/k RMS norms) for the SD3 presets."""
    root, _ = models
    tok1, n1 = write_clip_tokenizer(tmp_path / "tok1")
    tok2, n2 = write_clip_tokenizer(tmp_path / "tok2", pad="!")
    tok3, n3 = t5_tokenizer(tmp_path / "tok3")
    import transformers
    from test_mmdit import randomise as randomise_mmdit

    config = tiny_mmdit_config(presets.SD35_LARGE_TRANSFORMER)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=n3, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                                           num_heads=3, feed_forward_proj="gated-gelu"))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=randomise_mmdit(diffusers.SD3Transformer2DModel(**config).eval(), seed=30),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(31, use_quant_conv=False, use_post_quant_conv=False), text_encoder=clip_tower(n1, 32, 16, projection=16),
        tokenizer=tok1, text_encoder_2=clip_tower(n2, 33, 24, "gelu", projection=24), tokenizer_2=tok2,
        text_encoder_3=t5.eval(), tokenizer_3=tok3)
    return pipe, config


def transformer_pair(module, params, torch_model):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([1000.0, 250.0], np.float32)
    ctx = rng.standard_normal((2, 7, module.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, module.pooled_projection_dim)).astype(np.float32)
    ours = module.apply({"params": params}, jnp.asarray(z), jnp.asarray(t), encoder_hidden_states=jnp.asarray(ctx),
                        pooled_projections=jnp.asarray(pooled))
    with torch.no_grad():
        ref = torch_model(hidden_states=torch.from_numpy(nchw(z)), timestep=torch.from_numpy(t),
                          encoder_hidden_states=torch.from_numpy(ctx), pooled_projections=torch.from_numpy(pooled)).sample
    return ours, nhwc(ref.numpy())


def test_sd35_large_turbo_preset(tiny_sd3, models, tmp_path):
    root, register = models
    pipe, config = tiny_sd3
    pipe.save_pretrained(root / "sd35-large-turbo")
    register("sd35-large-turbo", expect={"transformer": {"qk_norm": "rms_norm", "num_layers": 2},
                                         "scheduler": {"shift": 3.0}})
    t2i = TextToImage.from_preset("sd35-large-turbo", cache_dir=tmp_path / "cache")
    assert t2i.family == "sd3" and t2i.network.qk_norm == "rms_norm" and t2i.plan(4).solver == "euler"
    ours, ref = transformer_pair(t2i.network, t2i.params["network"], pipe.transformer)
    assert_close(ours, ref, TOL, "SD3.5 Large Turbo transformer")


def test_sd3_lora_preset_scale(tiny_sd3, models, tmp_path):
    """Hyper-SD3's CFG LoRA on SD3: merged at the published 1/8, equal to diffusers' fuse_lora(0.125)."""
    root, register = models
    pipe, _ = tiny_sd3
    pipe.save_pretrained(root / "sd3-medium")
    register("sd3-medium", expect={"transformer": {"num_layers": 2}}, components={})
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(root / "sd3-medium" / "transformer")
    torch.manual_seed(4)
    transformer.add_adapter(peft_config(["to_q", "to_k", "to_v", "add_q_proj", "ff.net.2"]))
    preset = presets.get("hyper-sd3-4step-cfg-lora")
    (root / preset.name).mkdir()
    diffusers.StableDiffusion3Pipeline.save_lora_weights(root / preset.name, weight_name=preset.filename,
                                                         transformer_lora_layers=peft.get_peft_model_state_dict(transformer))
    merged = pretrained.load_pretrained(preset.name, cache_dir=tmp_path / "cache")
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(root / "sd3-medium")
    theirs.load_lora_weights(root / preset.name / preset.filename)
    theirs.fuse_lora(components=["transformer"], lora_scale=preset.sampler.lora_scale)
    ours, ref = transformer_pair(merged.module, merged.params, theirs.transformer)
    assert_close(ours, ref, TOL, "Hyper-SD3 LoRA at 0.125")
    full = diffusers.StableDiffusion3Pipeline.from_pretrained(root / "sd3-medium")
    full.load_lora_weights(root / preset.name / preset.filename)
    full.fuse_lora(components=["transformer"], lora_scale=1.0)
    _, at_one = transformer_pair(merged.module, merged.params, full.transformer)
    assert np.abs(at_one - ref).max() > 100 * TOL * np.abs(ref).max()  # the scale is the published one, not 1


def test_preset_not_found_names_the_repo_file(models):
    with pytest.raises(presets.PresetNotFound) as e:
        presets.locate("sdxl-lightning-4step-lora")
    msg = str(e.value)
    assert "huggingface-cli download ByteDance/SDXL-Lightning sdxl_lightning_4step_lora.safetensors" in msg
    assert str(models[0] / "sdxl-lightning-4step-lora" / "sdxl_lightning_4step_lora.safetensors") in msg
    # a generic LoRA file name is not looked for at the top of the models folder (any LoRA could be there)
    assert str(models[0] / "pytorch_lora_weights.safetensors") not in str(
        pytest.raises(presets.PresetNotFound, presets.locate, "lcm-lora-sdxl").value)
    assert json.dumps(presets.get("lcm-lora-sdxl").sampler.scheduler_config({"a": 1})) == \
        '{"a": 1, "_class_name": "LCMScheduler"}'


# ------------------------------------------------------------------------------- sampled as published


PROMPTS = ["a photo of a cat", "a red dog"]


def base_scheduler(root, sampler, base="sdxl"):
    """The student's scheduler on its base pipeline's scheduler_config.json, as a diffusers user loads
    it (from the folder: an in-memory config lists its class defaults in ``_use_default_values``,
    and ``from_config`` then swaps them for the new class's defaults, LCM's scaled_linear betas)."""
    return getattr(diffusers, sampler.scheduler).from_pretrained(root / base, subfolder="scheduler", **sampler.options)


def feed_step_noise(monkeypatch, pipe, shape, steps, seed=0):
    """Give the pipeline's scheduler, where it draws fresh noise (LCM, Euler ancestral), the noise
    TextToImage(seed=seed) draws at each step: step i's from fold_in(the sampler key, i)."""
    _, key_steps = jax.random.split(jax.random.key(seed))  # as TextToImage.generate splits its seed
    noises = (np.asarray(jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)) for i in range(steps))
    monkeypatch.setattr(RANDN_MODULES[type(pipe.scheduler)], "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(nchw(next(noises))))


def diffusers_latents(pipe, latents, steps, **kw):
    final = {}

    def keep(pipeline, step, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        pipe(prompt=PROMPTS, num_inference_steps=steps, latents=torch.from_numpy(nchw(latents)), height=16, width=16,
             output_type="latent", callback_on_step_end=keep, **kw)
    return nhwc(final["latents"].numpy())


@pytest.mark.slow  # 25 s: trailing Euler is default-tested against diffusers' scheduler, the SDXL UNet in other tests
def test_lightning_sampled_as_published(tiny_sdxl, models, tmp_path):
    """SDXL-Lightning's sampler (trailing Euler, guidance 0) is one jdistill already has: the
    student in its base pipeline gives diffusers' latents for the same noise."""
    root, register = models
    base_pipe, config = tiny_sdxl
    student = randomize_(diffusers.UNet2DConditionModel(**config), seed=43).eval()
    preset = presets.get("sdxl-lightning-4step-unet")
    (root / preset.name).mkdir()
    safetensors.torch.save_file(student.state_dict(), root / preset.name / preset.filename)
    register(preset.name, configs={"unet": {"_class_name": "UNet2DConditionModel", **config}})
    t2i = TextToImage.from_preset(preset.name, cache_dir=tmp_path / "cache")
    steps, g = preset.sampler.steps[0], preset.sampler.guidance_scale
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=g, latents=z, output_type="latent")
    base_pipe.unet = student
    base_pipe.scheduler = getattr(diffusers, preset.sampler.scheduler).from_config(
        base_pipe.scheduler.config, **preset.sampler.options)
    ref = diffusers_latents(base_pipe, z, steps, guidance_scale=g)
    assert_close(ours, ref, TOL, "SDXL-Lightning 4 steps, trailing Euler")


def test_sd35_turbo_sampled_as_published(tiny_sd3, models, tmp_path):
    root, register = models
    pipe, _ = tiny_sd3
    pipe.save_pretrained(root / "sd35-large-turbo")
    preset = register("sd35-large-turbo", expect={"transformer": {"qk_norm": "rms_norm"}})
    t2i = TextToImage.from_preset("sd35-large-turbo", cache_dir=tmp_path / "cache")
    steps, g = preset.sampler.steps[0], preset.sampler.guidance_scale
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=g, latents=z, output_type="latent", max_sequence_length=8)
    ref = diffusers_latents(pipe, z, steps, guidance_scale=g, max_sequence_length=8)
    assert_close(ours, ref, TOL, "SD3.5 Large Turbo 4 steps, flow Euler")


@pytest.mark.parametrize("name", ["hyper-sdxl-4step-lora",
                                  pytest.param("sdxl-lightning-4step-lora", marks=pytest.mark.slow)])
def test_sdxl_lora_sampled_as_published(name, tiny_sdxl, models, tmp_path):
    """Hyper-SDXL's 4-step LoRA (trailing DDIM) and SDXL-Lightning's (trailing Euler): merged into
    the base pipeline, sampled at guidance 0, equal to diffusers' pipeline with the LoRA fused and
    that scheduler."""
    root, register = models
    base_pipe, _ = tiny_sdxl
    preset = presets.get(name)
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sdxl" / "unet")
    torch.manual_seed(5)
    unet.add_adapter(peft_config(["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]))
    (root / preset.name).mkdir()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(root / preset.name, weight_name=preset.filename,
                                                          unet_lora_layers=peft.get_peft_model_state_dict(unet))
    t2i = TextToImage.from_preset(preset.name, cache_dir=tmp_path / "cache")
    assert t2i.scheduler_config["_class_name"] == preset.sampler.scheduler and t2i.plan(4).solver == "ddim"
    z = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    steps, g = preset.sampler.steps[0], preset.sampler.guidance_scale
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=g, latents=z, output_type="latent")
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(root / "sdxl")
    theirs.load_lora_weights(root / preset.name / preset.filename)
    theirs.fuse_lora(components=["unet"])
    theirs.scheduler = getattr(diffusers, preset.sampler.scheduler).from_config(theirs.scheduler.config,
                                                                                 **preset.sampler.options)
    ref = diffusers_latents(theirs, z, steps, guidance_scale=g)
    assert_close(ours, ref, TOL, f"{name}, {preset.sampler.scheduler} (trailing)")


@pytest.fixture
def tiny_sd15(models, tmp_path):
    """A tiny SD 1.5 pipeline standing in for the "sd15" preset: SD 1.5's UNet config scaled down (four
    blocks, three with cross-attention, one without), its published PNDMScheduler config."""
    root, register = models
    config = tiny_unet_config(presets.SD15_UNET)
    pipe = sd15_pipeline(root / "sd15", config, diffusers.PNDMScheduler.from_config(BASE_SCHEDULERS["sd15"]), seed=10)
    register("sd15", expect={"unet": {"cross_attention_dim": 32, "block_out_channels": config["block_out_channels"]}})
    return pipe, config


def save_lora(folder, preset, pipeline_cls, component, model, targets, seed):
    """A PEFT LoRA on ``model`` (random factors, nonzero B), saved with diffusers' save_lora_weights
    under the preset's published file name."""
    torch.manual_seed(seed)
    model.add_adapter(peft_config(targets))
    folder.mkdir()
    pipeline_cls.save_lora_weights(folder, weight_name=preset.filename,
                                   **{f"{component}_lora_layers": peft.get_peft_model_state_dict(model)})
    return folder / preset.filename


# the trailing-DDIM LoRA route samples by default on SDXL (test_sdxl_lora_sampled_as_published)
# the default suite keeps LCM-LoRA; the TCD and trailing-DDIM LoRAs are -m slow (their solvers are
# default-tested against diffusers' schedulers, trailing DDIM also on the SDXL LoRA): the 20-minute budget
@pytest.mark.parametrize("name", ["lcm-lora-sdv1-5", pytest.param("hyper-sd15-2step-lora", marks=pytest.mark.slow),
                                  pytest.param("hyper-sd15-1step-lora", marks=pytest.mark.slow)])
def test_sd15_lora_sampled_as_published(name, tiny_sd15, models, tmp_path, monkeypatch):
    """SD 1.5's LoRA students on the base pipeline: LCM-LoRA (4 LCM steps, guidance 1, diffusers fed
    jdistill's step noise), Hyper-SD15 2 steps (trailing DDIM) and Hyper-SD15 1 step (TCD at
    timestep 800, eta 1); each equal to diffusers' StableDiffusionPipeline with the LoRA loaded and
    fused and the published scheduler, on the same initial latents."""
    root, register = models
    preset = presets.get(name)
    s = preset.sampler
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "sd15" / "unet")
    lora_file = save_lora(root / name, preset, diffusers.StableDiffusionPipeline, "unet", unet,
                          ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"], seed=8)
    t2i = TextToImage.from_preset(name, cache_dir=tmp_path / "cache")
    steps = s.steps[0]
    timesteps = list(s.timesteps) if s.timesteps is not None else None
    assert t2i.scheduler_config["_class_name"] == s.scheduler
    assert t2i.plan(steps, timesteps=timesteps).solver == {"LCMScheduler": "lcm", "DDIMScheduler": "ddim",
                                                           "TCDScheduler": "tcd"}[s.scheduler]
    eta = s.eta if s.eta is not None else 0.0
    z = np.random.default_rng(9).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=s.guidance_scale, latents=z, output_type="latent",
               timesteps=timesteps, eta=eta)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd15", safety_checker=None,
                                                               requires_safety_checker=False)
    theirs.load_lora_weights(lora_file)
    theirs.fuse_lora(components=["unet"])
    theirs.scheduler = base_scheduler(root, s, base="sd15")
    if s.scheduler == "LCMScheduler":
        feed_step_noise(monkeypatch, theirs, z.shape, steps)
    ref = diffusers_latents(theirs, z, steps, guidance_scale=s.guidance_scale, eta=eta,
                            **({"timesteps": timesteps} if timesteps else {}))
    assert_close(ours, ref, TOL, f"{name}: {steps} {s.scheduler} steps")
    # the LoRA is in (merged into the weights both sides sampled with): the base UNet's differ
    base = TextToImage.from_preset("sd15", cache_dir=tmp_path / "cache").params["network"]
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), base, t2i.params["network"])
    assert sum(jax.tree.leaves(changed)) >= 10


def test_hyper_sd3_cfg_lora_sampled_as_published(tiny_sd3, models, tmp_path):
    """Hyper-SD3's 4-step CFG LoRA: merged at the published 1/8 into SD3, 4 FlowMatch Euler steps at
    guidance 3, equal to diffusers' pipeline with the LoRA fused at ``lora_scale=0.125`` (the card's
    route); diffusers' other route, the adapter kept and weighted by ``set_adapters``, gives the same."""
    root, register = models
    pipe, _ = tiny_sd3
    pipe.save_pretrained(root / "sd3-medium")
    register("sd3-medium", expect={"transformer": {"num_layers": 2}}, components={})
    preset = presets.get("hyper-sd3-4step-cfg-lora")
    s = preset.sampler
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(root / "sd3-medium" / "transformer")
    lora_file = save_lora(root / preset.name, preset, diffusers.StableDiffusion3Pipeline, "transformer", transformer,
                          ["to_q", "to_k", "to_v", "add_q_proj", "ff.net.2"], seed=6)
    t2i = TextToImage.from_preset(preset.name, cache_dir=tmp_path / "cache")
    steps = s.steps[0]
    assert t2i.plan(steps).solver == "euler" and s.guidance_scale == 3.0 and s.lora_scale == 0.125
    z = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = t2i(PROMPTS, num_steps=steps, guidance_scale=s.guidance_scale, latents=z, output_type="latent",
               max_sequence_length=8)
    fused = diffusers.StableDiffusion3Pipeline.from_pretrained(root / "sd3-medium")
    fused.load_lora_weights(lora_file)
    fused.fuse_lora(components=["transformer"], lora_scale=s.lora_scale)
    ref = diffusers_latents(fused, z, steps, guidance_scale=s.guidance_scale, max_sequence_length=8)
    assert_close(ours, ref, TOL, "Hyper-SD3 4 steps, guidance 3, LoRA fused at 1/8")
    weighted = diffusers.StableDiffusion3Pipeline.from_pretrained(root / "sd3-medium")
    weighted.load_lora_weights(lora_file, adapter_name="hyper")
    weighted.set_adapters(["hyper"], adapter_weights=[s.lora_scale])
    assert_close(diffusers_latents(weighted, z, steps, guidance_scale=s.guidance_scale, max_sequence_length=8), ref,
                 TOL, "set_adapters at 1/8 == fuse_lora(lora_scale=1/8)")
