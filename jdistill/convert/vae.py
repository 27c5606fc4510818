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
