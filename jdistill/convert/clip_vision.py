"""transformers CLIP image towers -> :class:`jdistill.models.clip_vision.CLIPVisionEncoder` params.

The family protocol: :func:`module_from_config`, :func:`load_params`, :func:`export_rules`,
:func:`example_inputs`. Accepted: ``CLIPVisionModelWithProjection`` and transformers 4
``CLIPVisionModel`` (keys under ``vision_model.``), transformers 5 ``CLIPVisionModel`` (saved
without the prefix), and a full ``CLIPModel`` read for its image tower and
``visual_projection`` (the text side skipped, as ``CLIPVisionModelWithProjection.from_pretrained``
skips it). The ``position_ids`` buffer old checkpoints carry is dropped.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jdistill.errors import InvalidArgument
from jdistill.convert import engine
from jdistill.convert.engine import ConversionError
from jdistill.models import layers
from jdistill.models.clip_vision import CLIPVisionEncoder

_VISION_TYPE, _FULL_TYPE = "clip_vision_model", "clip"
_WITH_PROJECTION = "CLIPVisionModelWithProjection"


def vision_fields(vision) -> dict:
    """CLIPVisionTransformer fields from a transformers ``CLIPVisionConfig``."""
    layers.hf_activation(vision.hidden_act)  # an unsupported activation fails here, not at the first call
    return dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                num_layers=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
                image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels,
                hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32, *,
                       with_projection: bool | None = None) -> CLIPVisionEncoder:
    """The module for a ``CLIPVisionConfig`` (model_type "clip_vision_model"; projected when its
    ``architectures`` name ``CLIPVisionModelWithProjection``) or a full ``CLIPConfig`` (its
    vision_config and ``visual_projection`` to the top-level ``projection_dim``), read by
    transformers' config classes."""
    import transformers

    config = dict(config)
    model_type = config.get("model_type", _VISION_TYPE)
    if model_type == _FULL_TYPE or "vision_config" in config:
        full = transformers.CLIPConfig.from_dict(config)
        vision, projection_dim, projected = full.vision_config, full.projection_dim, True
    elif model_type == _VISION_TYPE:
        vision = transformers.CLIPVisionConfig.from_dict(config)
        projection_dim = vision.projection_dim
        projected = _WITH_PROJECTION in (config.get("architectures") or [])
    else:
        raise InvalidArgument(f"not a CLIP vision config: model_type {model_type!r}")
    if with_projection is not None:
        projected = with_projection
    return CLIPVisionEncoder(**vision_fields(vision), projection_dim=projection_dim if projected else None,
                             dtype=dtype, param_dtype=param_dtype)


def export_rules(module=None) -> list[engine.Rule]:
    return [
        engine.drop(r"(^|\.)embeddings\.position_ids$"),
        engine.drop(r"^(text_model\.|text_projection\.|logit_scale$)"),  # a full CLIPModel's text side
        # transformers 5 saves CLIPVisionModel without the vision_model. prefix
        engine.rename(r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.", r"vision_model.\1."),
    ]


def example_inputs(module: CLIPVisionEncoder, batch: int = 1) -> tuple[tuple, dict]:
    return (jnp.zeros((batch, module.image_size, module.image_size, module.num_channels), jnp.float32),), {}


def check_family(keys) -> None:
    keys = list(keys)
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding.")) for k in keys):
        return
    guess = "a CLIP text encoder" if any(k.startswith(("text_model.", "embeddings.token_embedding.")) for k in keys) \
        else None
    raise ConversionError("not a CLIP vision tower checkpoint" + (f" (it looks like {guess})" if guess else "")
                          + f": no vision_model.* / embeddings.patch_embedding.* keys; its first keys are "
                          f"{sorted(keys)[:8]}")


def load_params(state_dict: Mapping, module: CLIPVisionEncoder):
    """Params for ``module`` from a CLIP vision state dict; every missing, unexpected or
    mis-shaped key, and a checkpoint of another family, raise :class:`ConversionError`."""
    check_family(state_dict.keys())
    args, kwargs = example_inputs(module)
    target = engine.abstract_params(module, *args, **kwargs)
    params, _ = engine.convert_state_dict(state_dict, target, export_rules(module), what="CLIP vision checkpoint")
    return params
