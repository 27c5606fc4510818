"""transformers CLIP text checkpoints -> :class:`jdistill.models.clip.CLIPTextEncoder` params.

The family protocol (shared with the other converters): :func:`module_from_config`,
:func:`load_params`, :func:`export_rules`, :func:`example_inputs`.

Accepted state dicts, all through the generic engine rule plus :func:`export_rules`:

* ``CLIPTextModelWithProjection`` and transformers 4 ``CLIPTextModel`` (keys under
  ``text_model.``; SD 1.x / 2.x / SDXL ``text_encoder*`` folders);
* transformers 5 ``CLIPTextModel``, saved without the ``text_model.`` prefix;
* a full ``CLIPModel`` (its text tower and ``text_projection``; the image tower and
  ``logit_scale`` are skipped, as ``CLIPTextModelWithProjection.from_pretrained`` skips them);
* the ``embeddings.position_ids`` buffer old checkpoints carry is dropped, as transformers
  drops it (positions are always 0..T-1).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jdistill.convert import engine
from jdistill.convert.engine import ConversionError
from jdistill.models import layers
from jdistill.models.clip import CLIPTextEncoder

# transformers' CLIP config model types: a text tower's config, or a full CLIPModel's
_TEXT_TYPE, _FULL_TYPE = "clip_text_model", "clip"
_WITH_PROJECTION = "CLIPTextModelWithProjection"

# Substrings that give away a checkpoint of another family, for the error message.
_OTHER_FAMILIES = (
    ("encoder.block.", "a T5 encoder"),
    ("shared.weight", "a T5 encoder"),
    ("vision_model.", "a CLIP vision tower"),
    ("conv_in.", "a UNet or VAE"),
    ("transformer_blocks.", "a diffusion transformer"),
)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32, *,
                       with_projection: bool | None = None) -> CLIPTextEncoder:
    """The module for a transformers config.json dict: a ``CLIPTextConfig`` (model_type
    "clip_text_model") or a full ``CLIPConfig`` (model_type "clip", its ``text_config``).

    The config is read by transformers' own config class, so defaults and legacy fields
    (``text_config_dict``) mean what they mean to transformers. The projection is there for
    a full CLIPConfig (``CLIPModel.text_projection``, to the top-level ``projection_dim``) and
    for a text config whose ``architectures`` name ``CLIPTextModelWithProjection``;
    ``with_projection`` overrides that (a CLIPTextConfig always carries a ``projection_dim``,
    used or not).
    """
    import transformers  # the config classes only; deferred so that importing jdistill stays light

    config = dict(config)
    model_type = config.get("model_type", _TEXT_TYPE)
    if model_type == _FULL_TYPE or "text_config" in config or "text_config_dict" in config:
        full = transformers.CLIPConfig.from_dict(config)
        text, projection_dim, projected = full.text_config, full.projection_dim, True
    elif model_type == _TEXT_TYPE:
        text = transformers.CLIPTextConfig.from_dict(config)
        projection_dim = text.projection_dim
        projected = _WITH_PROJECTION in (config.get("architectures") or [])
    else:
        raise ValueError(f"not a CLIP text config: model_type {model_type!r} (expected {_TEXT_TYPE!r} or "
                         f"{_FULL_TYPE!r})")
    if with_projection is not None:
        projected = with_projection
    if not isinstance(text.eos_token_id, int):
        raise ValueError(f"CLIP pooling needs a single integer eos_token_id, config has {text.eos_token_id!r}")
    layers.hf_activation(text.hidden_act)  # an unsupported activation fails here, not at the first call
    if projected and not projection_dim:
        raise ValueError("a projected CLIP text encoder needs projection_dim in its config")
    return CLIPTextEncoder(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        max_position_embeddings=text.max_position_embeddings, hidden_act=text.hidden_act,
        layer_norm_eps=text.layer_norm_eps, eos_token_id=text.eos_token_id,
        projection_dim=projection_dim if projected else None, dtype=dtype, param_dtype=param_dtype,
    )


def export_rules(module: CLIPTextEncoder | None = None) -> list[engine.Rule]:
    """The rules :func:`load_params` uses (the same for every CLIPTextEncoder). For export,
    ``engine.flax_to_torch_state_dict`` with the keys of the transformers model to write:
    either layout gets its own key names back."""
    return [
        # a buffer (0..max_positions-1) that transformers < 4.31 saved; transformers ignores it
        engine.drop(r"(^|\.)embeddings\.position_ids$"),
        # a full CLIPModel's image tower: not part of the text encoder
        engine.drop(r"^(vision_model\.|visual_projection\.|logit_scale$)"),
        # transformers 5 saves CLIPTextModel without the text_model. prefix
        engine.rename(r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),
    ]


def example_inputs(module: CLIPTextEncoder, batch: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) for ``module.init`` / ``engine.abstract_params``: a full-length row of ids."""
    return (jnp.zeros((batch, module.max_position_embeddings), jnp.int32),), {}


def check_family(keys) -> None:
    """Raise :class:`ConversionError` unless ``keys`` are a CLIP text encoder's (either layout)."""
    keys = list(keys)
    if any(k.startswith(("text_model.", "embeddings.token_embedding.", "encoder.layers.")) for k in keys):
        return
    guess = next((what for marker, what in _OTHER_FAMILIES if any(marker in k for k in keys)), None)
    raise ConversionError("not a CLIP text encoder checkpoint" + (f" (it looks like {guess})" if guess else "")
                          + ": it has no text_model.* / embeddings.token_embedding.* / encoder.layers.* keys; "
                          f"its first keys are {sorted(keys)[:8]}")


def load_params(state_dict: Mapping, module: CLIPTextEncoder):
    """Params for ``module`` (numpy, in its ``param_dtype``) from a CLIP text state dict (torch
    tensors or numpy arrays, e.g. a safetensors file read lazily). Every missing, unexpected or
    mis-shaped key, and a checkpoint of another family, raise :class:`ConversionError`."""
    check_family(state_dict.keys())
    args, kwargs = example_inputs(module)
    target = engine.abstract_params(module, *args, **kwargs)
    what = "CLIP text encoder checkpoint" + (" (with projection)" if module.projection_dim else "")
    params, _ = engine.convert_state_dict(state_dict, target, export_rules(module), what=what)
    return params
