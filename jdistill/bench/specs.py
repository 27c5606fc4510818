"""What the benchmark runs: models (a diffusers config both sides build), batches, presets.

Pure data, imported by the orchestrator and by both workers (no JAX, no PyTorch here).
A model is named by a diffusers class and config: the PyTorch worker builds that class,
draws its weights from a seed and saves them; the JAX worker converts those very tensors
through ``jdistill.convert`` (the family's ``module_from_config`` / ``load_params``), so both
sides run the same network with the same weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # jdistill.convert family: "dit", "unet_cond", "mmdit"
    diffusers_class: str
    config: dict[str, Any]
    batch: int
    # conditioning: class labels (DiT), text states (B, tokens, width) and pooled text (MMDiT)
    num_classes: int | None = None
    text_tokens: int | None = None
    schedule: str = "discrete"  # "discrete" (eps-prediction, DDIM) or "flow" (SD3, Euler)
    teacher_steps: int = 32
    student_steps: int = 4
    guidance_scale: float = 4.0

    @property
    def latent_hw(self) -> int:
        return int(self.config["sample_size"])

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def text_width(self) -> int | None:
        return self.config.get("cross_attention_dim") or self.config.get("joint_attention_dim")

    @property
    def pooled_width(self) -> int | None:
        return self.config.get("pooled_projection_dim")

    def with_batch(self, batch: int) -> "ModelSpec":
        return dataclasses.replace(self, batch=batch)


def _dit(name, depth, width, heads, sample_size, patch, num_classes, learn_sigma, batch):
    cfg = dict(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
               out_channels=8 if learn_sigma else 4, num_layers=depth, sample_size=sample_size, patch_size=patch,
               num_embeds_ada_norm=num_classes)
    return ModelSpec(name, "dit", "DiTTransformer2DModel", cfg, batch, num_classes=num_classes)


SD15_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def _sd15(name, widths, heads, cross_dim, sample_size, batch, groups=32):
    cfg = dict(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=2,
               norm_num_groups=groups, cross_attention_dim=cross_dim, attention_head_dim=heads, **SD15_BLOCKS)
    return ModelSpec(name, "unet_cond", "UNet2DConditionModel", cfg, batch, text_tokens=77, guidance_scale=7.5)


def _sd3(name, depth, heads, head_dim, sample_size, text_width, pooled, batch, qk_norm=None):
    cfg = dict(sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
               attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
               caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled,
               pos_embed_max_size=sample_size, qk_norm=qk_norm)
    return ModelSpec(name, "mmdit", "SD3Transformer2DModel", cfg, batch, text_tokens=77, schedule="flow",
                     guidance_scale=5.0)


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    # The DiT of the CPU comparison (8.05M params): diffusers layout, 16x16x4 latents, 64 tokens
    _dit("dit-cpu", depth=6, width=256, heads=4, sample_size=16, patch=2, num_classes=10, learn_sigma=False,
         batch=32),
    # DiT-S/2 and DiT-XL/2 at 256 px (32x32x4 SD-VAE latents), ImageNet classes, learned sigma
    _dit("dit-s2", depth=12, width=384, heads=6, sample_size=32, patch=2, num_classes=1000, learn_sigma=True,
         batch=256),
    _dit("dit-xl2", depth=28, width=1152, heads=16, sample_size=32, patch=2, num_classes=1000, learn_sigma=True,
         batch=64),
    # SD1.5's UNet: every block type of the real one (3 cross-attention levels, a plain one, a
    # cross-attention mid block, 2 resnets per level); the CPU one is narrower and 32x32
    _sd15("sd15-unet-cpu", widths=(32, 64, 128, 128), heads=2, cross_dim=256, sample_size=32, batch=4),
    _sd15("sd15-unet", widths=(320, 640, 1280, 1280), heads=8, cross_dim=768, sample_size=64, batch=16),
    # SD3-medium's structure (joint attention, context_pre_only last block), tiny for CPU
    _sd3("sd3-mmdit-cpu", depth=4, heads=4, head_dim=32, sample_size=32, text_width=128, pooled=128, batch=8),
)}

PRESETS = {
    "cpu": ("dit-cpu", "sd15-unet-cpu", "sd3-mmdit-cpu"),
    "gpu": ("dit-s2", "dit-xl2", "sd15-unet"),
}

TASKS = ("train", "student", "teacher")
TASK_NAMES = {"train": "train step", "student": "student sampling", "teacher": "teacher sampling (CFG)"}

# Tasks beyond the built-in ones: {name: (JAX builder, PyTorch builder or None)}, each builder a
# "module:function" that takes the worker's side object (``JaxSide`` / ``TorchSide``, holding
# the converted module, params, spec and conditions; the PyTorch one also gets ``impl``) and
# returns a function running one call. The LADD discriminator step joins here when jdistill
# has one; ``--tasks`` then accepts its name.
EXTRA_TASKS: dict[str, tuple[str, str | None]] = {}


def resolve(builder: str):
    """The function a "module:function" string names."""
    import importlib

    module, _, name = builder.partition(":")
    return getattr(importlib.import_module(module), name)
