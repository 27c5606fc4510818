"""diffusers ``ControlNetModel`` checkpoints (SD 1.x / 2.x / SDXL ControlNets) ->
:class:`jdistill.models.controlnet.ControlNetModel` params.

The generic rule maps every key (the Flax module has diffusers' attribute names); this module
implements the family protocol the registry calls: :func:`module_from_config`,
:func:`load_params`, :func:`export_rules`, :func:`example_inputs`.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jdistill.convert import engine
from jdistill.convert.unet_cond import convert_checked, diffusers_fields
from jdistill.models.controlnet import ControlNetModel

FAMILY = "ControlNetModel"

UNSUPPORTED_AT_DEFAULT = {"encoder_hid_dim": None, "encoder_hid_dim_type": None}
# only the "text" addition embedding (refused) reads it
INERT_KEYS = ("addition_embed_type_num_heads",)


def config_from_diffusers(config: Mapping) -> dict:
    """Keyword arguments for :class:`ControlNetModel` from a diffusers config.json dict."""
    return diffusers_fields(config, ControlNetModel, FAMILY, UNSUPPORTED_AT_DEFAULT, INERT_KEYS)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> ControlNetModel:
    """The Flax module for a diffusers ``ControlNetModel`` config.json dict."""
    return ControlNetModel(**config_from_diffusers(config), dtype=dtype, param_dtype=param_dtype)


def example_inputs(module: ControlNetModel, batch: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the right shapes for ``module.init``: latents, timestep, text
    tokens and a conditioning image of ``module.conditioning_factor`` times the latent size."""
    return module.example_inputs(batch)


def export_rules(module: ControlNetModel) -> list:
    """Params -> diffusers keys needs nothing beyond the generic rule."""
    return []


def load_params(state_dict: Mapping, module: ControlNetModel, *, dtype=None):
    """Flax params for ``module`` from a diffusers ControlNet state dict (read lazily, one
    tensor at a time); a ConversionError names every key that does not fit."""
    args, kwargs = module.example_inputs()
    target = engine.abstract_params(module, *args, **kwargs)
    return convert_checked(state_dict, target, export_rules(module), FAMILY, dtype)
