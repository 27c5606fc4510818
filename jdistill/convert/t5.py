"""transformers T5 encoder checkpoints -> :class:`jdistill.models.t5.T5Encoder` params.

The family protocol (shared with the other converters): :func:`module_from_config`,
:func:`load_params`, :func:`export_rules`, :func:`example_inputs`.

Every key converts by the generic engine rule, but for the token table. transformers'
``T5EncoderModel`` has two names for one tied tensor, ``shared.weight`` and
``encoder.embed_tokens.weight``, and checkpoints hold either or both (transformers 5 and
safetensors saves of transformers 4 keep ``shared.weight`` alone; other tools write both,
or only the encoder's). The Flax tree holds it once, as ``shared``:

* only ``encoder.embed_tokens.weight``: renamed to ``shared``;
* both: they must be equal (the one tensor, saved twice); the copy is skipped. Unequal
  tables are refused: transformers would silently run with ``shared.weight``.

A full encoder-decoder T5 checkpoint loads its encoder: ``decoder.*`` and ``lm_head.*`` are
skipped, as ``T5EncoderModel.from_pretrained`` skips them.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.convert import engine
from jdistill.convert.engine import ConversionError
from jdistill.models.t5 import T5Encoder

SHARED, EMBED_TOKENS = "shared.weight", "encoder.embed_tokens.weight"

# mT5 is T5 with other defaults; UMT5 (each layer its own relative bias) is not this network.
_MODEL_TYPES = ("t5", "mt5")

_OTHER_FAMILIES = (
    ("text_model.", "a CLIP text encoder"),
    ("embeddings.token_embedding.", "a CLIP text encoder"),
    ("encoder.layers.", "a CLIP text encoder"),
    ("conv_in.", "a UNet or VAE"),
    ("transformer_blocks.", "a diffusion transformer"),
)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> T5Encoder:
    """The module for a transformers T5 / mT5 config.json dict (an encoder-decoder config gives its
    encoder). Read by transformers' own config class, so missing fields take transformers'
    defaults for that model type."""
    import transformers  # the config classes only; deferred so that importing jdistill stays light

    config = dict(config)
    model_type = config.get("model_type", "t5")
    if model_type == "umt5":
        raise InvalidArgument("UMT5 gives every layer its own relative position bias; jdistill.models.t5 is T5's "
                         "encoder, where only the first layer has one")
    if model_type not in _MODEL_TYPES:
        raise InvalidArgument(f"not a T5 config: model_type {model_type!r} (expected one of {_MODEL_TYPES})")
    c = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    module = T5Encoder(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, feed_forward=c.feed_forward_proj,
        layer_norm_epsilon=c.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
    )
    if (module.gated, module.dense_act) != (c.is_gated_act, c.dense_act_fn):  # the two readings must agree
        raise InvalidArgument(f"feed_forward_proj {c.feed_forward_proj!r}: transformers reads (gated={c.is_gated_act}, "
                         f"{c.dense_act_fn!r}), jdistill ({module.gated}, {module.dense_act!r})")
    return module


def export_rules(module: T5Encoder | None = None) -> list[engine.Rule]:
    """The rules :func:`load_params` uses. For export (``engine.flax_to_torch_state_dict``) both
    names of the token table read ``shared``, so a T5EncoderModel's full state dict is written."""
    return [
        engine.drop(r"^(decoder\.|lm_head\.)"),
        engine.rename(r"^encoder\.embed_tokens\.", "shared."),
    ]


def example_inputs(module: T5Encoder, batch: int = 1, length: int = 8) -> tuple[tuple, dict]:
    """(args, kwargs) for ``module.init`` / ``engine.abstract_params`` (params do not depend on the
    length: T5 has no position table)."""
    return (jnp.zeros((batch, length), jnp.int32),), {"attention_mask": jnp.ones((batch, length), jnp.int32)}


def check_family(keys) -> None:
    """Raise :class:`ConversionError` unless ``keys`` are a T5 encoder's."""
    keys = list(keys)
    if any(k.startswith("encoder.block.") for k in keys):
        return
    guess = next((what for marker, what in _OTHER_FAMILIES if any(marker in k for k in keys)), None)
    raise ConversionError("not a T5 encoder checkpoint" + (f" (it looks like {guess})" if guess else "")
                          + f": it has no encoder.block.* keys; its first keys are {sorted(keys)[:8]}")


class _Without(Mapping):
    """A lazy view of a state dict without some keys (values still read on demand)."""

    def __init__(self, state_dict: Mapping, skip: set[str]):
        self._sd, self._skip = state_dict, skip

    def __getitem__(self, key):
        if key in self._skip:
            raise KeyError(key)
        return self._sd[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._sd.keys() if k not in self._skip)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def untie(state_dict: Mapping) -> Mapping:
    """``state_dict`` with the token table under one name (see the module docstring)."""
    keys = set(state_dict.keys())
    if not {SHARED, EMBED_TOKENS} <= keys:
        return state_dict
    shared, embed = engine._to_numpy(state_dict[SHARED]), engine._to_numpy(state_dict[EMBED_TOKENS])
    if shared.shape != embed.shape or not np.array_equal(shared, embed):
        raise ConversionError(f"{EMBED_TOKENS} differs from {SHARED}: T5EncoderModel ties the two (transformers "
                              f"would run with {SHARED} and ignore the other); refusing to guess")
    return _Without(state_dict, {EMBED_TOKENS})


def load_params(state_dict: Mapping, module: T5Encoder):
    """Params for ``module`` (numpy, in its ``param_dtype``) from a T5 encoder state dict (torch
    tensors or numpy arrays, e.g. a safetensors file read lazily). Every missing, unexpected or
    mis-shaped key, untied token tables and a checkpoint of another family raise
    :class:`ConversionError`."""
    check_family(state_dict.keys())
    args, kwargs = example_inputs(module)
    target = engine.abstract_params(module, *args, **kwargs)
    params, _ = engine.convert_state_dict(untie(state_dict), target, export_rules(module),
                                          what="T5 encoder checkpoint")
    return params


def config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """A ``T5EncoderModel`` config.json dict from a T5 encoder state dict's shapes: heads of width
    64 and relative positions up to 128 (T5 v1.1's, SD3's T5-XXL's; neither is in the weights),
    "gated-gelu" when the feed-forward is gated (v1.1), else "relu"."""
    table = SHARED if SHARED in shapes else EMBED_TOKENS
    vocab, width = shapes[table]
    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = shapes[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"][0]
    if inner % 64:
        raise InvalidArgument(f"a T5 attention of width {inner} has no whole number of 64-wide heads")
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab, "d_model": width,
            "d_kv": 64, "d_ff": ff, "num_layers": layers, "num_heads": inner // 64,
            "relative_attention_num_buckets": shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
                                                     ".weight"][0],
            "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu" if gated else "relu",
            "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0}
