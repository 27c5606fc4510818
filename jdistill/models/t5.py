"""The T5 encoder in Flax: transformers' ``T5EncoderModel`` (T5, T5 v1.1, mT5, Flan-T5).

The text encoder of SD3 / Flux / PixArt / DeepFloyd IF is T5 v1.1-XXL's encoder; the same
module covers every T5 encoder through its fields
(``jdistill.convert.t5.module_from_config`` reads them from a config.json):

* ``feed_forward`` "relu" (original T5): ``DenseReluDense/{wi, wo}``, wo(act(wi x));
  "gated-gelu" (v1.1, mT5, Flan): ``DenseReluDense/{wi_0, wi_1, wo}``, wo(act(wi_0 x) * wi_1 x).
  ``dense_act`` is the activation's transformers name (gated-gelu means "gelu_new", the
  tanh approximation).
* No absolute positions: a learned bias per head and per *relative position bucket* is
  added to the attention logits. Only the first block owns the table
  (``block_0/layer_0/SelfAttention/relative_attention_bias``); the bias it computes is
  passed on to every later block, exactly as transformers shares it.
* No attention scaling (T5 folds 1/sqrt(d) into its init), no biases in any Linear, and
  RMS layer norms (``layers.RMSNorm``: scale only, no mean subtraction, fp32 statistics).

Params: ``shared`` (the token table) and ``encoder/...`` with transformers' names:
``encoder/block_N/layer_0/{layer_norm, SelfAttention/{q, k, v, o}}``,
``encoder/block_N/layer_1/{layer_norm, DenseReluDense/...}``, ``encoder/final_layer_norm``.
transformers' ``encoder.embed_tokens`` is tied to ``shared`` (T5Config forces
``tie_word_embeddings``), so the Flax tree holds the table once, as ``shared``.

Call: ``module.apply({"params": p}, input_ids, attention_mask=None)``, integer ids (B, T)
and an optional (B, T) mask of 1 (token) / 0 (padding); padding positions are masked as
keys but still computed as queries, as in transformers. Returns :class:`T5EncoderOutput`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jdistill.models import layers

Dtype = layers.Dtype


@flax.struct.dataclass
class T5EncoderOutput:
    last_hidden_state: jax.Array  # (B, T, d_model), after final_layer_norm
    # num_layers + 1 arrays (B, T, d_model): the token embeddings, then each block's output before
    # the final norm. (transformers 5 reports the same except that its last entry is replaced by
    # last_hidden_state.)
    hidden_states: tuple


def relative_position_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """T5's bucket of each relative position (key position - query position), as int32 numpy.

    Bidirectional: half the buckets for keys after the query, half for keys before. In each
    half, distances below ``n // 2`` (n = buckets in the half) get a bucket each; larger
    ones share logarithmically wider buckets up to ``max_distance``, beyond which all fall
    in the last. The logarithm is evaluated in float32 numpy, in the order transformers
    evaluates it in float32 torch, so that distances on a bucket edge round the same way.
    """
    rel = np.asarray(relative_position, np.int64)
    bucket = np.zeros(rel.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        bucket += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # np.maximum(.., 1): log(0) is never selected (is_small), but would warn
    scaled = (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (bucket + np.where(is_small, rel, large)).astype(np.int32)


class T5Attention(nn.Module):
    """``q`` / ``k`` / ``v`` / ``o`` (no biases, no scaling) plus, when ``has_relative_attention_bias``,
    the ``relative_attention_bias`` table (num_buckets, heads). Returns (output, position_bias) so
    that the first layer's bias can be handed to the next ones."""

    d_model: int
    num_heads: int
    d_kv: int
    has_relative_attention_bias: bool = False
    num_buckets: int = 32
    max_distance: int = 128
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def compute_bias(self, length: int):
        """(1, heads, T, T) bias for a bidirectional encoder: the bucket table is static (numpy at
        trace time), the lookup is one gather."""
        positions = np.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], True, self.num_buckets,
                                           self.max_distance)
        table = nn.Embed(self.num_buckets, self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(self.d_model ** -0.5),
                         name="relative_attention_bias")
        return jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]

    @nn.compact
    def __call__(self, x, mask=None, position_bias=None):
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_heads * self.d_kv
        split = lambda y: y.reshape(y.shape[:-1] + (self.num_heads, self.d_kv))  # noqa: E731
        q, k, v = (split(layers.dense(inner, name, **kw)(x)) for name in ("q", "k", "v"))
        if position_bias is None and self.has_relative_attention_bias:
            position_bias = self.compute_bias(x.shape[1])
        # the kernel layers.attention wraps, called directly for the two things T5 needs and that
        # wrapper does not take: an additive logit bias and no 1/sqrt(d) scaling
        out = jax.nn.dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0)
        return layers.dense(self.d_model, "o", **kw)(out.reshape(out.shape[:-2] + (-1,))), position_bias


class T5DenseActDense(nn.Module):
    """``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)``; transformers calls both
    ``DenseReluDense``."""

    d_model: int
    d_ff: int
    gated: bool
    dense_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act = layers.hf_activation(self.dense_act)
        if self.gated:
            h = act(layers.dense(self.d_ff, "wi_0", **kw)(x)) * layers.dense(self.d_ff, "wi_1", **kw)(x)
        else:
            h = act(layers.dense(self.d_ff, "wi", **kw)(x))
        return layers.dense(self.d_model, "wo", **kw)(h)


class T5LayerSelfAttention(nn.Module):
    """``layer_0``: x + SelfAttention(layer_norm(x))."""

    d_model: int
    num_heads: int
    d_kv: int
    has_relative_attention_bias: bool
    num_buckets: int
    max_distance: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.RMSNorm(self.eps, name="layer_norm", **kw)(x)
        h, position_bias = T5Attention(self.d_model, self.num_heads, self.d_kv, self.has_relative_attention_bias,
                                       self.num_buckets, self.max_distance, name="SelfAttention", **kw)(
            h, mask, position_bias)
        return x + h, position_bias


class T5LayerFF(nn.Module):
    """``layer_1``: x + DenseReluDense(layer_norm(x))."""

    d_model: int
    d_ff: int
    gated: bool
    dense_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.RMSNorm(self.eps, name="layer_norm", **kw)(x)
        return x + T5DenseActDense(self.d_model, self.d_ff, self.gated, self.dense_act, name="DenseReluDense",
                                   **kw)(h)


class T5Block(nn.Module):
    """``block_N``: ``layer_0`` (self-attention) then ``layer_1`` (feed-forward). Only block 0 has
    ``has_relative_attention_bias``; it returns the bias it computed for the later blocks."""

    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    has_relative_attention_bias: bool
    num_buckets: int
    max_distance: int
    gated: bool
    dense_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask, position_bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, position_bias = T5LayerSelfAttention(self.d_model, self.num_heads, self.d_kv,
                                                self.has_relative_attention_bias, self.num_buckets,
                                                self.max_distance, self.eps, name="layer_0", **kw)(
            h, mask, position_bias)
        h = T5LayerFF(self.d_model, self.d_ff, self.gated, self.dense_act, self.eps, name="layer_1", **kw)(h)
        return h, position_bias


class T5Stack(nn.Module):
    """``encoder``: ``block_N`` and ``final_layer_norm``, over already embedded tokens. Returns
    (last_hidden_state, hidden_states)."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    gated: bool
    dense_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden_states, position_bias = [h], None
        for i in range(self.num_layers):
            h, position_bias = T5Block(self.d_model, self.d_kv, self.d_ff, self.num_heads, i == 0, self.num_buckets,
                                       self.max_distance, self.gated, self.dense_act, self.eps, name=f"block_{i}",
                                       **kw)(h, mask, position_bias)
            hidden_states.append(h)
        last = layers.RMSNorm(self.eps, name="final_layer_norm", **kw)(h)
        return last, tuple(hidden_states)


class T5Encoder(nn.Module):
    """transformers' ``T5EncoderModel``: ``shared`` token table, then ``encoder``. Defaults are
    T5 v1.1-XXL's encoder (SD3 / Flux); see the module docstring for the call."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward: str = "gated-gelu"  # transformers' feed_forward_proj: "relu", "gated-gelu", "gated-silu", ...
    layer_norm_epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def gated(self) -> bool:
        return self.feed_forward.startswith("gated-")

    @property
    def dense_act(self) -> str:
        """The feed-forward activation's transformers name, read off ``feed_forward`` as T5Config
        does (its "gated-gelu" is, for backward compatibility, the tanh "gelu_new")."""
        parts = self.feed_forward.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward {self.feed_forward!r}: expected 'ACT' or 'gated-ACT' (e.g. 'relu', "
                             "'gated-gelu')")
        return "gelu_new" if self.feed_forward == "gated-gelu" else parts[-1]

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> T5EncoderOutput:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(1.0), name="shared",
                     **kw)(jnp.asarray(input_ids, jnp.int32))
        # (B, 1, 1, T): padding is masked as a key for every query and head
        mask = None if attention_mask is None else (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        last, hidden_states = T5Stack(self.d_model, self.d_kv, self.d_ff, self.num_layers, self.num_heads,
                                      self.relative_attention_num_buckets, self.relative_attention_max_distance,
                                      self.gated, self.dense_act, self.layer_norm_epsilon, name="encoder", **kw)(
            h, mask)
        return T5EncoderOutput(last_hidden_state=last, hidden_states=hidden_states)
