"""Names for the public checkpoints jdistill distils, resolved to local copies only.

A preset records where the checkpoint is published (hub id, or URL for the original
DiT files), the component classes its ``model_index.json`` names, and the config
values that identify it (sample sizes, cross-attention widths, the scheduler's
prediction type, ...), as published in the public configs. :func:`resolve` finds a
local copy and checks it against those values; nothing is downloaded. Where it looks,
in order:

1. ``models_dir`` (an argument), then each folder of ``$JDISTILL_MODELS`` (``os.pathsep``
   separated): ``<dir>/<preset name>``, ``<dir>/<org>--<repo>``, ``<dir>/<org>/<repo>``,
   ``<dir>/<repo>`` and the Hugging Face cache layout ``<dir>/models--<org>--<repo>``;
   for a single-file preset ``<dir>/<file>`` and ``<dir>/<preset name>/<file>``;
2. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``): ``models--<org>--<repo>/snapshots/<revision>``, the
   revision ``refs/main`` names first, then the newest.

Values marked in :data:`ABSENT_MEANS` are checked against the library default when
a config omits them (SD 1.5's scheduler config predates ``prediction_type``).

The distilled students are presets of four kinds, each with the sampler its authors
publish (:class:`Sampler`: a diffusers scheduler class, its options, the step counts,
timesteps, guidance and LoRA scale, recorded as data; the solvers themselves live in
``jdistill.sampling``):

* a pipeline folder (SDXL-Turbo, SD3.5 Large Turbo, LCM Dreamshaper v7);
* a model folder or a bare UNet file in diffusers' layout that replaces its ``base``
  preset's UNet (LCM-SDXL; SDXL-Lightning's and Hyper-SD's ``*_unet.safetensors``), carrying
  the published UNet config (``configs``);
* a LoRA file on a ``base`` preset (LCM-LoRA, SDXL-Lightning LoRAs, Hyper-SD LoRAs): loading
  it loads the base model with the LoRA merged at the published scale.

The published configs and sampler settings are written here from the public model cards
and config.json files as known when this was written: they could not be downloaded to check
(nothing is, here). A local copy is still checked against ``expect`` before converting.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from jdistill.convert import io
from jdistill.errors import UserError
from jdistill.paths import model_roots

# The configs key of model_index.json in check(); the key of a single model's config is SINGLE.
INDEX = "model_index.json"
SINGLE = "model"

# A key a config may omit, and what diffusers then uses.
ABSENT_MEANS = {"prediction_type": "epsilon", "scaling_factor": 0.18215}


class PresetNotFound(UserError, FileNotFoundError):
    """No local copy of a preset; the message lists every place looked at and how to provide one."""


class PresetMismatch(UserError, ValueError):
    """A local folder found for a preset that is not that checkpoint (names every differing value)."""


@dataclass(frozen=True)
class Sampler:
    """How the authors of a checkpoint sample it, as data: a diffusers scheduler class and the
    options its pipeline is given (``Scheduler.from_config(base_config, **options)``), the step
    counts published, explicit ``timesteps`` where the card passes them, diffusers'
    ``guidance_scale`` (0 / 1: no classifier-free guidance; LCM: the w of its guidance
    embedding, w - 1 = guidance_scale - 1), a stochastic sampler's ``eta`` and the LoRA scale.

    jdistill samples each with the solver of ``jdistill.pipelines.scheduling`` that reproduces its
    scheduler (tests/test_presets.py), TCD (Hyper-SD's one-step LoRAs) included, ``eta`` passed
    as the pipeline's ``eta`` is."""

    scheduler: str
    options: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[int, ...] = ()
    guidance_scale: float = 0.0
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None
    lora_scale: float | None = None
    note: str = ""

    def scheduler_config(self, base: Mapping | None = None) -> dict:
        """A scheduler_config.json dict: ``base`` (the base pipeline's scheduler config) with this
        class and options, as ``from_config(base, **options)`` makes it."""
        return {**dict(base or {}), **dict(self.options), "_class_name": self.scheduler}


@dataclass(frozen=True)
class Preset:
    name: str
    repo_id: str  # the Hugging Face hub id (the diffusers folder), or "" for a file published elsewhere
    description: str
    pipeline: tuple[str, ...] = ()  # accepted model_index.json _class_name; empty for a single file
    components: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> accepted classes
    expect: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # component ("" = the file) -> values
    default_component: str | None = None  # what load_pretrained(preset) returns without component=
    filename: str | None = None  # single-file presets: the file's published name
    url: str | None = None
    mirrors: tuple[str, ...] = ()  # other hub ids publishing the same files
    folder: str = "pipeline"  # what a local copy of a folder preset is: "pipeline" (model_index.json) or "model"
    base: str | None = None  # the preset this model file / LoRA goes with
    replaces: str | None = None  # the base's component this model stands for (a UNet file: "unet")
    lora: bool = False  # the file is a LoRA for ``base``
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # published config.json per component
    sampler: Sampler | None = None  # how its authors sample it

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    @property
    def file_config(self) -> Mapping | None:
        """The published config that describes a bare model file of this preset (None: the file
        describes itself, or the preset is a folder or a LoRA)."""
        if self.is_file and self.replaces and not self.lora:
            return self.configs.get(self.replaces)
        return None

    def hub_ids(self) -> tuple[str, ...]:
        return tuple(r for r in (self.repo_id, *self.mirrors) if r)

    def where_published(self) -> str:
        return self.url or f"https://huggingface.co/{self.repo_id}"


_SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012}
_DIT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
_DIT_TRANSFORMER = {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2,
                    "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero"}
_DIT_ORIGINAL = {"patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28, "num_heads": 16,
                 "num_classes": 1000, "learn_sigma": True}
_SD_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
               "tokenizer": ("CLIPTokenizer",)}

# ---- published configs of the students (config.json as on the hub, written from knowledge: see the module docstring)

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True}
# LCM distils a w-conditioned student: the guidance scale enters as a 256-wide embedding (timestep_cond)
LCM_SD15_UNET = {**SD15_UNET, "time_cond_proj_dim": 256}
LCM_SDXL_UNET = {**SDXL_UNET, "time_cond_proj_dim": 256}
SDXL_TURBO_UNET = {**SDXL_UNET, "sample_size": 64}  # ADD-distilled at 512 px
# the refiner: 4 levels, 64-wide heads, 4 transformer layers a block, text_encoder_2's states alone (1280),
# pooled text 1280 + 5 time ids x 256 (the aesthetic score replaces the target size). Checked field by field
# against the network the weights were trained as (Stability-AI/generative-models,
# configs/inference/sd_xl_refiner.yaml): model_channels 384 x channel_mult (1, 2, 4, 4), attention at
# the 2x and 4x levels, num_head_channels 64, transformer_depth 4, context_dim 1280, adm_in_channels 2560,
# num_res_blocks 2, linear transformer projections
SDXL_REFINER_UNET = {
    **SDXL_UNET, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
SDXL_REFINER_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SD3_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128}
SD35_LARGE_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
    "sample_size": 128, "dual_attention_layers": []}
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
    "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None}
SDXL_TURBO_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": None}

_SDXL_PIPE = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
              "text_encoder_2": ("CLIPTextModelWithProjection",)}
_SD3_PIPE = {"transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
             "text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
             "text_encoder_3": ("T5EncoderModel",), "scheduler": ("FlowMatchEulerDiscreteScheduler",)}
_UNET_EXPECT = ("sample_size", "cross_attention_dim", "block_out_channels", "time_cond_proj_dim",
                "addition_time_embed_dim")


def _expect(config: Mapping, keys=_UNET_EXPECT) -> dict:
    return {k: config[k] for k in keys if k in config and config[k] is not None}


def _lightning(steps: int) -> tuple:
    """SDXL-Lightning (Lin et al.): progressive adversarial distillation of SDXL, a UNet file and
    (2 / 4 / 8 steps) a LoRA; sampled with trailing-spaced Euler at guidance 0; the 1-step UNet
    predicts x0 (prediction_type "sample")."""
    x0 = steps == 1
    sampler = Sampler("EulerDiscreteScheduler", {"timestep_spacing": "trailing",
                                                 **({"prediction_type": "sample"} if x0 else {})},
                      steps=(steps,), guidance_scale=0.0)
    repo = "ByteDance/SDXL-Lightning"
    out = [Preset(f"sdxl-lightning-{steps}step-unet", repo, f"SDXL-Lightning {steps}-step UNet (SDXL base, "
                  "diffusers-layout UNet state dict)", filename=f"sdxl_lightning_{steps}step_unet{'_x0' if x0 else ''}"
                  ".safetensors", base="sdxl", replaces="unet", default_component="unet",
                  configs={"unet": SDXL_UNET}, sampler=sampler)]
    if not x0:
        out.append(Preset(f"sdxl-lightning-{steps}step-lora", repo, f"SDXL-Lightning {steps}-step LoRA for SDXL base",
                          filename=f"sdxl_lightning_{steps}step_lora.safetensors", base="sdxl", replaces="unet",
                          lora=True, default_component="unet", sampler=sampler))
    return tuple(out)


def _hyper(base: str, steps: int) -> Preset:
    """Hyper-SD (Ren et al.): trajectory-segmented consistency distillation with human feedback,
    as LoRAs; 2-8 steps with trailing DDIM at guidance 0, one step with TCD (eta 1) at timestep 800."""
    sd = "SD15" if base == "sd15" else "SDXL"
    one = steps == 1
    sampler = (Sampler("TCDScheduler", steps=(1,), guidance_scale=0.0, timesteps=(800,), eta=1.0) if one else
               Sampler("DDIMScheduler", {"timestep_spacing": "trailing"}, steps=(steps,), guidance_scale=0.0))
    return Preset(f"hyper-{base}-{steps}step-lora", "ByteDance/Hyper-SD", f"Hyper-SD {steps}-step LoRA for {base}",
                  filename=f"Hyper-{sd}-{steps}step{'s' if steps > 1 else ''}-lora.safetensors", base=base,
                  replaces="unet", lora=True, default_component="unet", sampler=sampler)


def _hyper_sd3(steps: int) -> Preset:
    """Hyper-SD3's CFG-preserving LoRAs: FlowMatch Euler with guidance 3 and the LoRA at 1/8."""
    return Preset(f"hyper-sd3-{steps}step-cfg-lora", "ByteDance/Hyper-SD",
                  f"Hyper-SD3 {steps}-step CFG-preserving LoRA for SD3 Medium",
                  filename=f"Hyper-SD3-{steps}steps-CFG-lora.safetensors", base="sd3-medium", replaces="transformer",
                  lora=True, default_component="transformer",
                  sampler=Sampler("FlowMatchEulerDiscreteScheduler", steps=(steps,), guidance_scale=3.0,
                                  lora_scale=0.125))


STUDENTS: tuple[Preset, ...] = (
    Preset("lcm-dreamshaper-v7", "SimianLuo/LCM_Dreamshaper_v7",
           "LCM (Luo et al.) distilled from Dreamshaper v7 (an SD 1.5 fine-tune): w-conditioned UNet, 1-8 steps",
           pipeline=("LatentConsistencyModelPipeline",), default_component="unet",
           components={"unet": ("UNet2DConditionModel",), "scheduler": ("LCMScheduler",)},
           configs={"unet": LCM_SD15_UNET, "scheduler": LCM_SCHEDULER},
           expect={"unet": _expect(LCM_SD15_UNET), "scheduler": {"original_inference_steps": 50}},
           sampler=Sampler("LCMScheduler", steps=(4, 1, 2, 8), guidance_scale=8.0,
                           note="guidance enters as LCM's w embedding (timestep_cond), one pass per step")),
    Preset("lcm-sdxl", "latent-consistency/lcm-sdxl", "LCM distilled from SDXL base: its UNet folder", folder="model",
           base="sdxl", replaces="unet", default_component="unet", configs={"unet": LCM_SDXL_UNET},
           expect={"": _expect(LCM_SDXL_UNET)},
           sampler=Sampler("LCMScheduler", steps=(4, 2, 8), guidance_scale=8.0,
                           note="guidance enters as LCM's w embedding (timestep_cond)")),
    Preset("lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdv1-5", "LCM-LoRA (Luo et al.) for SD 1.5",
           filename="pytorch_lora_weights.safetensors", base="sd15", replaces="unet", lora=True,
           default_component="unet",
           sampler=Sampler("LCMScheduler", steps=(4, 2, 8), guidance_scale=1.0,
                           note="guidance 1 (none) to 2; no w embedding: the LoRA is w-free")),
    Preset("lcm-lora-sdxl", "latent-consistency/lcm-lora-sdxl", "LCM-LoRA for SDXL base",
           filename="pytorch_lora_weights.safetensors", base="sdxl", replaces="unet", lora=True,
           default_component="unet", sampler=Sampler("LCMScheduler", steps=(4, 2, 8), guidance_scale=1.0)),
    Preset("sdxl-turbo", "stabilityai/sdxl-turbo", "SDXL-Turbo (Sauer et al., ADD): 512 px, 1-4 steps, no guidance",
           pipeline=("StableDiffusionXLPipeline",), components=_SDXL_PIPE, default_component="unet",
           configs={"unet": SDXL_TURBO_UNET, "scheduler": SDXL_TURBO_SCHEDULER},
           expect={"unet": _expect(SDXL_TURBO_UNET),
                   "scheduler": {"timestep_spacing": "trailing"}},
           sampler=Sampler("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, steps=(1, 2, 4),
                           guidance_scale=0.0)),
    *_lightning(1), *_lightning(2), *_lightning(4), *_lightning(8),
    Preset("hyper-sdxl-1step-unet", "ByteDance/Hyper-SD", "Hyper-SDXL 1-step UNet (SDXL base, diffusers layout)",
           filename="Hyper-SDXL-1step-Unet.safetensors", base="sdxl", replaces="unet", default_component="unet",
           configs={"unet": SDXL_UNET},
           sampler=Sampler("LCMScheduler", steps=(1,), guidance_scale=0.0, timesteps=(800,))),
    *(_hyper(b, n) for b in ("sd15", "sdxl") for n in (1, 2, 4, 8)),
    *(_hyper_sd3(n) for n in (4, 8, 16)),
    Preset("sd35-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo",
           "SD3.5 Large Turbo (a LADD student of SD3.5 Large): 4 steps, no guidance",
           pipeline=("StableDiffusion3Pipeline",), components=_SD3_PIPE, default_component="transformer",
           configs={"transformer": SD35_LARGE_TRANSFORMER},
           expect={"transformer": _expect(SD35_LARGE_TRANSFORMER, ("num_layers", "num_attention_heads",
                                                                   "caption_projection_dim", "qk_norm")),
                   "scheduler": {"shift": 3.0}},
           sampler=Sampler("FlowMatchEulerDiscreteScheduler", steps=(4,), guidance_scale=0.0)),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "sd15", "runwayml/stable-diffusion-v1-5", "Stable Diffusion 1.5 (512 px, epsilon prediction)",
        pipeline=("StableDiffusionPipeline",), components=_SD_CLASSES, default_component="unet",
        # runwayml's repo was withdrawn in 2024; the same files live on under this id
        mirrors=("stable-diffusion-v1-5/stable-diffusion-v1-5",), configs={"unet": SD15_UNET},
        expect={
            "unet": {"sample_size": 64, "in_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8,
                     "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2},
            "vae": {"latent_channels": 4, "scaling_factor": 0.18215},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon"},
        }),
    Preset(
        "sd21", "stabilityai/stable-diffusion-2-1", "Stable Diffusion 2.1 (768 px, v-prediction)",
        pipeline=("StableDiffusionPipeline",), components=_SD_CLASSES, default_component="unet",
        expect={
            "unet": {"sample_size": 96, "in_channels": 4, "cross_attention_dim": 1024,
                     "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                     "block_out_channels": [320, 640, 1280, 1280]},
            "vae": {"latent_channels": 4, "scaling_factor": 0.18215},
            "text_encoder": {"hidden_size": 1024, "num_hidden_layers": 23},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        }),
    Preset(
        "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "Stable Diffusion XL base 1.0 (1024 px, epsilon)",
        pipeline=("StableDiffusionXLPipeline",), default_component="unet", configs={"unet": SDXL_UNET},
        components={**_SD_CLASSES, "text_encoder_2": ("CLIPTextModelWithProjection",),
                    "tokenizer_2": ("CLIPTokenizer",)},
        expect={
            "unet": {"sample_size": 128, "in_channels": 4, "cross_attention_dim": 2048,
                     "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
                     "attention_head_dim": [5, 10, 20], "addition_embed_type": "text_time",
                     "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
            "vae": {"latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12},
            "text_encoder_2": {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon", "timestep_spacing": "leading",
                          "steps_offset": 1},
        }),
    Preset(
        "sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers",
        "Stable Diffusion 3 Medium (MMDiT, rectified flow, 1024 px)",
        pipeline=("StableDiffusion3Pipeline",), default_component="transformer",
        configs={"transformer": SD3_MEDIUM_TRANSFORMER},
        components={"transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
                    "text_encoder": ("CLIPTextModelWithProjection",),
                    "text_encoder_2": ("CLIPTextModelWithProjection",), "text_encoder_3": ("T5EncoderModel",),
                    "scheduler": ("FlowMatchEulerDiscreteScheduler",)},
        expect={
            "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                            "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64,
                            "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                            "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
            "vae": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            "text_encoder": {"hidden_size": 768, "projection_dim": 768},
            "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280},
            "text_encoder_3": {"d_model": 4096, "num_layers": 24},
            "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
        }),
    Preset(
        "dit-xl-2-256", "facebook/DiT-XL-2-256", "DiT-XL/2, ImageNet 256 px (diffusers)",
        pipeline=("DiTPipeline",), default_component="transformer",
        components={"transformer": ("Transformer2DModel", "DiTTransformer2DModel"), "vae": ("AutoencoderKL",)},
        expect={"transformer": {**_DIT_TRANSFORMER, "sample_size": 32}, "vae": {"latent_channels": 4},
                "scheduler": _DIT_SCHEDULER},
        configs={"transformer": {"_class_name": "DiTTransformer2DModel", **_DIT_TRANSFORMER, "sample_size": 32}}),
    Preset(
        "dit-xl-2-512", "facebook/DiT-XL-2-512", "DiT-XL/2, ImageNet 512 px (diffusers)",
        pipeline=("DiTPipeline",), default_component="transformer",
        components={"transformer": ("Transformer2DModel", "DiTTransformer2DModel"), "vae": ("AutoencoderKL",)},
        expect={"transformer": {**_DIT_TRANSFORMER, "sample_size": 64}, "vae": {"latent_channels": 4},
                "scheduler": _DIT_SCHEDULER},
        configs={"transformer": {"_class_name": "DiTTransformer2DModel", **_DIT_TRANSFORMER, "sample_size": 64}}),
    Preset(
        "dit-xl-2-256-original", "", "DiT-XL/2, ImageNet 256 px (the original facebookresearch EMA weights)",
        filename="DiT-XL-2-256x256.pt", url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
        expect={"": {**_DIT_ORIGINAL, "input_size": 32}},
        configs={"": {"_class_name": "DiT", **_DIT_ORIGINAL, "input_size": 32, "mlp_ratio": 4.0}}),
    Preset(
        "dit-xl-2-512-original", "", "DiT-XL/2, ImageNet 512 px (the original facebookresearch EMA weights)",
        filename="DiT-XL-2-512x512.pt", url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
        expect={"": {**_DIT_ORIGINAL, "input_size": 64}},
        configs={"": {"_class_name": "DiT", **_DIT_ORIGINAL, "input_size": 64, "mlp_ratio": 4.0}}),
    Preset(
        "bk-sdm-tiny", "nota-ai/bk-sdm-tiny", "BK-SDM-Tiny: SD 1.4 with a block-removed, distilled UNet (512 px)",
        pipeline=("StableDiffusionPipeline",), components=_SD_CLASSES, default_component="unet",
        expect={
            "unet": {"sample_size": 64, "in_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8,
                     "block_out_channels": [320, 640, 1280], "layers_per_block": 1, "mid_block_type": None,
                     "down_block_types": ["CrossAttnDownBlock2D"] * 3,
                     "up_block_types": ["CrossAttnUpBlock2D"] * 3},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon"},
        }),
    Preset(
        "sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0",
        "Stable Diffusion XL refiner 1.0 (img2img, text_encoder_2 only, aesthetic-score time ids)",
        pipeline=("StableDiffusionXLImg2ImgPipeline",), default_component="unet",
        components={"unet": ("UNet2DConditionModel",), "text_encoder_2": ("CLIPTextModelWithProjection",)},
        configs={"unet": SDXL_REFINER_UNET, "scheduler": SDXL_REFINER_SCHEDULER},
        expect={"unet": {"cross_attention_dim": 1280, "addition_time_embed_dim": 256,
                         "projection_class_embeddings_input_dim": 2560},
                "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280}}),
    *STUDENTS,
)}

ALIASES = {"sd1.5": "sd15", "sd-1.5": "sd15", "sd2.1": "sd21", "sd-2.1": "sd21", "sdxl-base": "sdxl",
           "sd3": "sd3-medium", "dit-xl/2-256": "dit-xl-2-256", "dit-xl/2-512": "dit-xl-2-512"}


def find(name: str) -> Preset | None:
    """The preset called ``name`` (or an alias, or its hub id), else None."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    return next((p for p in PRESETS.values() if str(name) in p.hub_ids()), None)


def get(name: str) -> Preset:
    preset = find(name)
    if preset is None:
        raise KeyError(f"no preset {name!r}; known: {', '.join(PRESETS)}")
    return preset


class NoPublishedConfig(UserError, KeyError):
    """A preset whose network's config is not written here (only checked against a local copy)."""


def published_config(preset: Preset | str, component: str | None = None) -> dict:
    """The published config of one network of a preset (its default component unless
    ``component``; "" for a bare file), from :attr:`Preset.configs`: enough to build the
    network without its weights (``pretrained.published_module``)."""
    preset = get(preset) if isinstance(preset, str) else preset
    component = preset.default_component or "" if component is None else component
    config = preset.configs.get(component)
    if config is None and preset.base and preset.replaces == component:  # a LoRA / UNet file of its base
        return published_config(preset.base, component)
    if config is None:
        raise NoPublishedConfig(f"preset {preset.name!r} has no published config for {component or 'its file'!r} "
                                f"here (written: {sorted(preset.configs) or 'none'})")
    return dict(config)


# ---------------------------------------------------------------- finding a local copy


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _snapshots(repo_dir: Path) -> list[Path]:
    """A hub-cache repo folder's snapshots: the one refs/main names, then the newest first."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return [snaps]  # listed so the message shows it was looked at
    out = []
    main = repo_dir / "refs" / "main"
    if main.is_file():
        out.append(snaps / main.read_text().strip())
    out += sorted((p for p in snaps.iterdir() if p.is_dir() and p not in out), key=lambda p: -p.stat().st_mtime)
    return out


def candidates(preset: Preset, models_dir=None, hub_cache=None) -> list[Path]:
    """Every place :func:`resolve` looks, in order. A file published in a hub repo (a LoRA, a
    UNet file) is looked for in that repo's folders, where a generic name
    (``pytorch_lora_weights.safetensors``) cannot be mistaken for another preset's."""
    roots = model_roots(models_dir)
    cache = Path(hub_cache).expanduser() if hub_cache else hub_cache_dir()
    out: list[Path] = []
    for root in roots:
        folders = [root / preset.name]
        for repo in preset.hub_ids():
            org, _, base = repo.partition("/")
            folders += [root / f"{org}--{base}", root / org / base, root / base]
            folders += _snapshots(root / f"models--{org}--{base}")
        if preset.is_file:
            out += ([] if preset.repo_id else [root / preset.filename]) + [f / preset.filename for f in folders]
        else:
            out += folders
    for repo in preset.hub_ids():
        snaps = _snapshots(cache / f"models--{repo.replace('/', '--')}")
        out += [s / preset.filename for s in snaps] if preset.is_file else snaps
    return list(dict.fromkeys(out))


def _is_copy(preset: Preset, path: Path) -> bool:
    if preset.is_file:
        return path.is_file()
    return (path / (io.CONFIG_NAME if preset.folder == "model" else io.PIPELINE_INDEX)).is_file()


def locate(preset: Preset | str, models_dir=None, hub_cache=None) -> Path:
    """The local copy of ``preset``; no network, nothing read but directory entries. Raises
    :class:`PresetNotFound` naming every place looked at and how to provide the copy."""
    preset = get(preset) if isinstance(preset, str) else preset
    looked = candidates(preset, models_dir, hub_cache)
    for path in looked:
        if _is_copy(preset, path):
            return path
    raise PresetNotFound(_not_found_message(preset, looked))


def _not_found_message(preset: Preset, looked: list[Path]) -> str:
    lines = [f"preset {preset.name!r} ({preset.description}; {preset.where_published()}) has no local copy. "
             "Looked in:"]
    lines += [f"  {p}" for p in looked]
    if not os.environ.get("JDISTILL_MODELS"):
        lines.append("  ($JDISTILL_MODELS is not set: no models folder was searched)")
    if preset.is_file and not preset.repo_id:
        how = (f"download {preset.url} where there is network, put it at $JDISTILL_MODELS/{preset.filename}, "
               "or pass the file's path instead of the preset name")
    elif preset.is_file:
        how = (f"download it where there is network (`huggingface-cli download {preset.repo_id} {preset.filename} "
               f"--local-dir $JDISTILL_MODELS/{preset.name}`, or into the Hugging Face cache), or pass the file's "
               "path instead of the preset name")
    else:
        how = (f"download it where there is network (`huggingface-cli download {preset.repo_id} --local-dir "
               f"$JDISTILL_MODELS/{preset.name}`, or into the Hugging Face cache), copy it here and set "
               "JDISTILL_MODELS (or HF_HOME / HF_HUB_CACHE), or pass the folder's path instead of the preset name")
    lines.append(f"jdistill never downloads: {how}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- checking a copy


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_values(config: Mapping, expect: Mapping, where: str) -> list[str]:
    problems = []
    for key, want in expect.items():
        if key in config:
            have = config[key]
        elif key in ABSENT_MEANS:
            have = ABSENT_MEANS[key]
        else:
            problems.append(f"{where}: {key} absent, expected {want!r}")
            continue
        if not _same(have, want):
            problems.append(f"{where}: {key} is {have!r}, expected {want!r}")
    return problems


def check(preset: Preset, configs: Mapping[str, Mapping]) -> list[str]:
    """What in ``configs`` (component -> config dict, with ``"scheduler"`` and :data:`INDEX` for
    model_index.json where known) differs from the preset; empty when it is the checkpoint.
    Components whose config is not there (a partial download, a component not converted) are
    not checked here; converting one of them fails on its own."""
    problems = []
    index = configs.get(INDEX)
    if index is not None and not preset.is_file:
        if preset.pipeline and index.get("_class_name") not in preset.pipeline:
            problems.append(f"model_index.json: _class_name is {index.get('_class_name')!r}, expected "
                            f"{' or '.join(preset.pipeline)}")
        for name, accepted in preset.components.items():
            entry = index.get(name)
            cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            if cls not in accepted:
                problems.append(f"model_index.json: {name} is {cls!r}, expected {' or '.join(accepted)}")
    for name, expect in preset.expect.items():
        config = configs.get(name or SINGLE)
        if config is not None:
            where = ("scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json") if name \
                else "the file"
            problems += check_values(config, expect, where)
    return problems


def ensure(preset: Preset, configs: Mapping[str, Mapping], where) -> None:
    """:class:`PresetMismatch` unless :func:`check` finds nothing."""
    problems = check(preset, configs)
    if problems:
        raise PresetMismatch(_mismatch_message(preset, where, problems))


def _mismatch_message(preset: Preset, path, problems: list[str]) -> str:
    return (f"{path} was found for preset {preset.name!r} ({preset.description}) but is not that checkpoint:\n  "
            + "\n  ".join(problems) + "\n(to use this folder anyway, pass its path instead of the preset name)")


def folder_mismatches(preset: Preset, path: Path) -> list[str]:
    """What in the local folder copy ``path`` of a pipeline preset differs from it, from its JSON
    configs alone (file and model presets are checked against their plan: ``pretrained.resolve_preset``)."""
    configs = {INDEX: io.read_json(Path(path) / io.PIPELINE_INDEX)}
    for name in preset.expect:
        sub = Path(path) / name
        file = next((sub / f for f in ("config.json", "scheduler_config.json") if (sub / f).is_file()), None)
        if file is not None:
            configs[name] = io.read_json(file)
    return check(preset, configs)