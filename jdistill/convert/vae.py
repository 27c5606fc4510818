"""diffusers ``AutoencoderKL`` checkpoints (``vae/`` of SD 1.x / 2.x / SDXL / SD3 / Flux) ->
:class:`jdistill.models.vae.AutoencoderKL` params.

The generic rule maps every key. Checkpoints written before diffusers renamed its attention
projections (``query`` / ``key`` / ``value`` / ``proj_attn``: the original SD VAE uploads)
go through the same renames as old ``UNet2DModel`` checkpoints
(``convert.unet2d.DEPRECATED_ATTENTION_RULES``). Family protocol: :func:`module_from_config`,
:func:`load_params`, :func:`export_rules`, :func:`example_inputs`.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jdistill.convert import engine
from jdistill.convert.unet2d import DEPRECATED_ATTENTION_RULES
from jdistill.convert.unet_cond import convert_checked, diffusers_fields
from jdistill.models.vae import AutoencoderKL

FAMILY = "AutoencoderKL"

VAE_RULES = list(DEPRECATED_ATTENTION_RULES)


def config_from_diffusers(config: Mapping) -> dict:
    """Keyword arguments for :class:`AutoencoderKL` from a diffusers config.json dict."""
    return diffusers_fields(config, AutoencoderKL, FAMILY)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> AutoencoderKL:
    """The Flax module for a diffusers ``AutoencoderKL`` config.json dict (scaling_factor,
    shift_factor and latents_mean / latents_std come with it)."""
    return AutoencoderKL(**config_from_diffusers(config), dtype=dtype, param_dtype=param_dtype)


def example_inputs(module: AutoencoderKL, batch: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``module.init``: an image batch the encoder halves to 1x1
    (``__call__`` encodes and decodes, so every param is made)."""
    size = 2 ** (len(module.block_out_channels) - 1)
    return (jnp.zeros((batch, size, size, module.in_channels), jnp.float32),), {}


def export_rules(module: AutoencoderKL) -> list:
    """Params -> diffusers keys (the current names) needs nothing beyond the generic rule."""
    return []


def load_params(state_dict: Mapping, module: AutoencoderKL, *, dtype=None):
    """Flax params for ``module`` from a diffusers VAE state dict, current or pre-rename
    attention names (read lazily, one tensor at a time); a ConversionError names every key
    that does not fit."""
    args, kwargs = example_inputs(module)
    target = engine.abstract_params(module, *args, **kwargs)
    return convert_checked(state_dict, target, VAE_RULES, FAMILY, dtype)


# ---------------------------------------------------------------- the original (LDM) layout
#
# Single-file checkpoints keep the VAE (``first_stage_model.*``) in the CompVis layout:
# ``encoder.down.N.block.M``, ``decoder.up.N`` numbered from the lowest resolution up (the
# reverse of diffusers' ``up_blocks``), ``mid.block_1/2``, ``mid.attn_1`` with 1x1-conv
# projections ``q`` / ``k`` / ``v`` / ``proj_out`` and a ``norm``.

_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_table(config: Mapping) -> dict[str, str]:
    """Original module name -> diffusers module name for the VAE ``config`` describes."""
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 1)
    table = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
        table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        for j in range(layers + 1):
            table[f"decoder.up.{i}.block.{j}"] = f"decoder.up_blocks.{n - 1 - i}.resnets.{j}"
        table[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv"
    for part in ("encoder", "decoder"):
        for i in (1, 2):
            table[f"{part}.mid.block_{i}"] = f"{part}.mid_block.resnets.{i - 1}"
        for old, new in _LDM_ATTENTION.items():
            table[f"{part}.mid.attn_1.{old}"] = f"{part}.mid_block.attentions.0.{new}"
    for old in [k for k in table if ".block." in k or ".block_" in k]:
        table[f"{old}.nin_shortcut"] = f"{table[old]}.conv_shortcut"
    return table


def ldm_rules(config: Mapping) -> list:
    """Rules reading an original-layout VAE state dict (its prefix removed) as diffusers keys."""
    return [engine.rename_table(ldm_table(config), "original SD VAE"),
            engine.squeeze_1x1(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")]


def config_from_ldm(shapes: Mapping[str, tuple], *, sample_size: int, scaling_factor: float,
                    shift_factor: float | None = None) -> dict:
    """A diffusers ``AutoencoderKL`` config read off an original-layout VAE's shapes (prefix
    removed); the image size and the latent scaling are the model family's (not in the weights),
    and the group-norm count is SD's 32."""
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    config = {
        "_class_name": FAMILY, "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels), "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels, "layers_per_block": layers, "act_fn": "silu",
        "latent_channels": shapes["decoder.conv_in.weight"][1], "norm_num_groups": 32, "sample_size": sample_size,
        "scaling_factor": scaling_factor, "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in shapes),
    }
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
    return config
