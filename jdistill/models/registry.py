"""Models by name, for configs: ``model = dict(name="dit", hidden_size=128, ...)``.

``build_model(cfg)`` makes the Flax module; ``example_inputs(module)`` gives
arguments of the right shapes for ``module.init`` / ``jax.eval_shape``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dit(preset: str | None = None, **fields):
    from jdistill.models import dit

    return dit.dit_config(preset, **fields) if preset else dit.DiT(**fields)


def _unet2d(**fields):
    from jdistill.models import unet2d

    return unet2d.UNet2DModel(**fields)


MODELS: dict[str, Callable[..., nn.Module]] = {"dit": _dit, "unet2d": _unet2d}


def build_model(cfg) -> nn.Module:
    fields = dict(cfg)
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    for key in ("dtype", "param_dtype"):
        if isinstance(fields.get(key), str):
            fields[key] = DTYPES[fields[key]]
    for key, value in list(fields.items()):
        if isinstance(value, list):  # configs restored from JSON give lists where modules want tuples
            fields[key] = tuple(value)
    try:
        return MODELS[name](**fields)
    except TypeError as e:
        raise ValueError(f"model {name!r}: {e}") from e


def image_shape(module) -> tuple[int, int, int]:
    """(H, W, C) of the images the module denoises."""
    if hasattr(module, "input_size"):
        return (module.input_size, module.input_size, module.in_channels)
    size = module.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (*size, module.in_channels)


def example_inputs(module, batch: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of zeros with the right shapes and dtypes for ``module.init``."""
    if hasattr(module, "example_inputs"):  # UNet2DConditionModel, ControlNet
        return module.example_inputs(batch)
    if hasattr(module, "dummy_inputs"):  # UNet2DModel
        return (), module.dummy_inputs(batch)
    from jdistill.models import dit

    if isinstance(module, dit.DiT):
        return (), dit.example_inputs(module, batch)
    raise ValueError(f"no example inputs known for {type(module).__name__}")


def num_classes(module) -> int | None:
    return getattr(module, "num_classes", None) or getattr(module, "num_class_embeds", None)
