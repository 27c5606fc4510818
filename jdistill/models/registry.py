"""Models by name, for configs: ``model = dict(name="dit", hidden_size=128, ...)``.

``build_model(cfg)`` makes the Flax module; ``example_inputs(module)`` gives
arguments of the right shapes for ``module.init`` / ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
    """A class-conditional network's labels: 0..num_classes-1 are real, ``null_id`` means "no class"."""

    num_classes: int
    null_id: int | None


def class_conditioning(module) -> ClassConditioning | None:
    """How ``module`` reads class labels, the same rule for every family (None: not class-conditional).

    DiT: a table of ``num_classes`` rows plus the null row ``num_classes`` (``null_class``).
    UNet2DModel with a label table (``num_class_embeds``): jdistill keeps its last row for the
    null class, so ``num_class_embeds - 1`` classes are real.
    """
    if getattr(module, "num_classes", None):
        k = int(module.num_classes)
        return ClassConditioning(k, k if getattr(module, "null_class", True) else None)
    embeds = getattr(module, "num_class_embeds", None)
    if embeds and getattr(module, "class_embed_type", None) is None:
        return ClassConditioning(int(embeds) - 1, int(embeds) - 1)
    return None


def num_classes(module) -> int | None:
    """Real classes of a class-conditional network (its null row excluded), else None."""
    classes = class_conditioning(module)
    return classes.num_classes if classes is not None else None


def guidance_input_kind(module) -> str | None:
    """The input through which ``module`` reads the guidance scale, so that it samples guided in one
    pass without classifier-free guidance: "timestep_cond" (an SD UNet with ``time_cond_proj_dim``:
    LCM's w embedding, as diffusers' LatentConsistencyModelPipeline passes it), "guidance" (a
    guidance-distilled student's embedder, ``guidance_embed=True``) or None (it does not)."""
    if getattr(module, "time_cond_proj_dim", None):
        return "timestep_cond"
    if getattr(module, "guidance_embed", False):
        return "guidance"
    return None


def learned_variance(module) -> bool:
    """Whether the network outputs a variance beside its prediction (2x its input channels)."""
    out = getattr(module, "output_channels", None) or getattr(module, "out_channels", None)
    return bool(out) and out == 2 * module.in_channels
