"""transformers ``CLIPModel`` checkpoints (both towers, projections, logit scale) ->
:class:`jdistill.models.clip_vision.CLIPModel` params. The family protocol, as the other
converters; the generic rule maps every key once the ``position_ids`` buffers are dropped."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jdistill.errors import InvalidArgument
from jdistill.convert import clip, clip_vision, engine
from jdistill.convert.engine import ConversionError
from jdistill.models.clip_vision import CLIPModel

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPModel:
    """The module for a full ``CLIPConfig`` (model_type "clip"): the text tower as
    :func:`jdistill.convert.clip.module_from_config` reads it, the image tower as
    :func:`jdistill.convert.clip_vision.module_from_config` does."""
    import transformers

    config = dict(config)
    if config.get("model_type") != "clip" and "vision_config" not in config:
        raise InvalidArgument(f"not a CLIPModel config: model_type {config.get('model_type')!r}")
    text = clip.module_from_config(config, with_projection=False)
    vision = clip_vision.vision_fields(transformers.CLIPConfig.from_dict(config).vision_config)
    return CLIPModel(text=tuple((f, getattr(text, f)) for f in _TEXT_FIELDS), vision=tuple(vision.items()),
                     projection_dim=transformers.CLIPConfig.from_dict(config).projection_dim, dtype=dtype,
                     param_dtype=param_dtype)


def export_rules(module=None) -> list[engine.Rule]:
    return [engine.drop(r"(^|\.)embeddings\.position_ids$")]


def example_inputs(module: CLIPModel, batch: int = 1) -> tuple[tuple, dict]:
    text, vision = dict(module.text), dict(module.vision)
    ids = jnp.zeros((batch, text["max_position_embeddings"]), jnp.int32)
    pixels = jnp.zeros((batch, vision["image_size"], vision["image_size"], vision["num_channels"]), jnp.float32)
    return (ids, pixels), {}


def load_params(state_dict: Mapping, module: CLIPModel):
    keys = list(state_dict.keys())
    if not (any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.") for k in keys)):
        raise ConversionError(f"not a CLIPModel checkpoint: it needs text_model.* and vision_model.* keys; its first "
                              f"keys are {sorted(keys)[:8]}")
    args, kwargs = example_inputs(module)
    target = engine.abstract_params(module, *args, **kwargs)
    params, _ = engine.convert_state_dict(state_dict, target, export_rules(module), what="CLIPModel checkpoint")
    return params
