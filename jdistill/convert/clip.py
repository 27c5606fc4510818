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

import re
from typing import Mapping

import jax.numpy as jnp

from jdistill.errors import InvalidArgument
from jdistill.convert import engine
from jdistill.convert.engine import ConversionError
from jdistill.models import layers
from jdistill.models.clip import LEGACY_EOS_TOKEN_ID, CLIPTextEncoder

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
        raise InvalidArgument(f"not a CLIP text config: model_type {model_type!r} (expected {_TEXT_TYPE!r} or "
                         f"{_FULL_TYPE!r})")
    if with_projection is not None:
        projected = with_projection
    if not isinstance(text.eos_token_id, int):
        raise InvalidArgument(f"CLIP pooling needs a single integer eos_token_id, config has {text.eos_token_id!r}")
    layers.hf_activation(text.hidden_act)  # an unsupported activation fails here, not at the first call
    if projected and not projection_dim:
        raise InvalidArgument("a projected CLIP text encoder needs projection_dim in its config")
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


# ---------------------------------------------------------------- configs read off shapes; OpenCLIP


def text_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                max_positions: int, hidden_act: str, projection_dim: int | None) -> dict:
    """A transformers text-tower config.json dict the way SD pipelines ship theirs: heads of
    width 64 (every CLIP text tower's), the legacy ``eos_token_id`` 2 of SD's configs (pooling at
    the largest id), ``CLIPTextModelWithProjection`` when there is a projection."""
    if hidden_size % 64:
        raise InvalidArgument(f"a CLIP text tower of width {hidden_size} has no whole number of 64-wide heads")
    arch = _WITH_PROJECTION if projection_dim else "CLIPTextModel"
    return {"architectures": [arch], "model_type": _TEXT_TYPE, "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
            "num_attention_heads": hidden_size // 64, "max_position_embeddings": max_positions,
            "hidden_act": hidden_act, "layer_norm_eps": 1e-5, "projection_dim": projection_dim or hidden_size,
            "bos_token_id": 0, "eos_token_id": LEGACY_EOS_TOKEN_ID, "pad_token_id": 1}


def config_from_shapes(shapes: Mapping[str, tuple], *, hidden_act: str, projection_dim: int | None) -> dict:
    """A text-tower config from a transformers-layout CLIP state dict's shapes (``text_model.``)."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    layers = len({k.split(".")[3] for k in shapes if k.startswith("text_model.encoder.layers.")})
    return text_config(vocab_size=vocab, hidden_size=width,
                       intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0], num_layers=layers,
                       max_positions=shapes["text_model.embeddings.position_embedding.weight"][0],
                       hidden_act=hidden_act, projection_dim=projection_dim)


_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn": "self_attn", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2"}


def openclip_table(num_layers: int) -> dict[str, str]:
    """OpenCLIP module name -> transformers module name (``in_proj`` stays fused here; the rules
    split it)."""
    table = {"token_embedding": "text_model.embeddings.token_embedding",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final": "text_model.final_layer_norm", "text_projection": "text_projection.weight"}
    for i in range(num_layers):
        table.update({f"transformer.resblocks.{i}.{a}": f"text_model.encoder.layers.{i}.{b}"
                      for a, b in _OPENCLIP_LAYER.items()})
    return table


def openclip_rules(num_layers: int, projection: bool) -> list[engine.Rule]:
    """Rules reading an OpenCLIP text tower (SD 2.x ``cond_stage_model.model.``, SDXL's
    ``conditioner.embedders.1.model.``; prefix removed) as transformers keys: fused
    ``in_proj`` split into q / k / v, the ``x @ P`` projection transposed to a Linear weight.
    Layers from ``num_layers`` on are dropped (SD 2.x conditions on the penultimate layer, so its
    text encoder is saved without the last, as diffusers' is), and so is the projection unless
    ``projection``."""
    table = openclip_table(num_layers)

    def drop_later_layers(key, tensor):
        m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        return [] if m and int(m[1]) >= num_layers else None

    rules = [drop_later_layers, engine.drop(r"^(logit_scale|attn_mask)$")]
    if not projection:
        rules.append(engine.drop(r"^text_projection$"))
    return rules + [engine.rename_table(table, "OpenCLIP text tower"),
                    engine.rename(r"\.in_proj_(weight|bias)$", r".in_proj.\1"),
                    engine.split(r"\.self_attn\.in_proj\.", ("q_proj", "k_proj", "v_proj")),
                    engine.transpose(r"^text_projection\.weight$")]


def openclip_config(shapes: Mapping[str, tuple], *, num_layers: int | None = None, projection: bool) -> dict:
    """A text-tower config from an OpenCLIP state dict's shapes (prefix removed); ``num_layers``
    keeps the first layers only (SD 2.x: all but the last)."""
    vocab, width = shapes["token_embedding.weight"]
    layers = len({k.split(".")[2] for k in shapes if k.startswith("transformer.resblocks.")})
    return text_config(vocab_size=vocab, hidden_size=width,
                       intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
                       num_layers=layers if num_layers is None else num_layers,
                       max_positions=shapes["positional_embedding"][0], hidden_act="gelu",
                       projection_dim=shapes["text_projection"][1] if projection else None)
