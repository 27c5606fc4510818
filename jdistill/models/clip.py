"""CLIP text encoders in Flax: transformers' ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.

One module, :class:`CLIPTextEncoder`, covers the text towers diffusion pipelines use,
all through its fields (``jdistill.convert.clip.module_from_config`` reads them from a
transformers config.json):

* OpenAI CLIP ViT-L/14 (SD 1.x, SDXL ``text_encoder``): ``hidden_act="quick_gelu"``,
  no projection;
* OpenCLIP ViT-H/14 (SD 2.x) and ViT-bigG/14 (SDXL ``text_encoder_2``): ``hidden_act="gelu"``,
  bigG with ``projection_dim`` set (``CLIPTextModelWithProjection``).

The network is a pre-LayerNorm causal transformer: token + learned position embeddings,
``num_layers`` blocks of x + attn(LN1(x)), x + MLP(LN2(x)), then ``final_layer_norm``.

Param names follow transformers' attributes under ``text_model`` (the layout of
transformers 4 checkpoints and of ``CLIPTextModelWithProjection``), e.g.
``text_model/encoder/layers_3/self_attn/q_proj/kernel``, plus ``text_projection``
when ``projection_dim`` is set. transformers 5 saves a plain ``CLIPTextModel`` without
the ``text_model.`` prefix; the converter adds it back.

Call: ``module.apply({"params": p}, input_ids, attention_mask=None)`` with integer ids
(B, T), T <= ``max_position_embeddings``, and an optional (B, T) padding mask of 1 / 0
(combined with the causal mask, as transformers does; SD pipelines pass none). Returns
a :class:`CLIPTextOutput`.

Pooling (``pooler_output``) follows transformers exactly. The pooled token is the
end-of-text token, found through the config's ``eos_token_id``:

* ``eos_token_id == 2`` is the value every CLIP config carried before transformers PR
  #24773 (the SD 1.x / 2.x / SDXL text encoder configs still do), and means the legacy
  rule: the position of the largest id in each row. That is the end-of-text token of the original vocab
  (49407, the largest id) whatever the pad token, but not with added tokens above it;
* any other value: the first position where ``input_ids == eos_token_id`` (the first,
  because a pad token may equal the eos token), position 0 if a row has none.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdistill.models import layers

Dtype = layers.Dtype

# The eos id of configs written before transformers fixed it: selects the argmax-of-ids rule.
LEGACY_EOS_TOKEN_ID = 2


@flax.struct.dataclass
class CLIPTextOutput:
    """What :class:`CLIPTextEncoder` returns (all in the module's ``dtype``)."""

    last_hidden_state: jax.Array  # (B, T, D), after final_layer_norm
    pooler_output: jax.Array  # (B, D): last_hidden_state at the end-of-text token
    # num_layers + 1 arrays (B, T, D): the embeddings, then each layer's output, without the
    # final norm (transformers' ``hidden_states``). hidden_states[-2] is the "penultimate layer"
    # SDXL conditions on.
    hidden_states: tuple
    text_embeds: jax.Array | None = None  # (B, projection_dim): text_projection(pooler_output)


def eos_positions(input_ids, eos_token_id: int):
    """The index of the pooled (end-of-text) token of each row, by transformers' rule (see the
    module docstring). ``input_ids`` (B, T) -> (B,) int32."""
    ids = jnp.asarray(input_ids, jnp.int32)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1)
    # argmax returns the first maximum: the first eos, or 0 when there is none (as torch does)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


def causal_mask(length: int, attention_mask=None):
    """Boolean (B or 1, 1, T, T) mask, True where a query may attend: keys at or before the query,
    and, with a (B, T) ``attention_mask``, only keys it marks as tokens."""
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    if attention_mask is not None:
        mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
    return mask


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding`` + ``position_embedding`` (positions 0..T-1)."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        length = input_ids.shape[-1]
        if length > self.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(0.02))
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding",
                             **kw)(jnp.arange(length))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``
    (transformers' names, hence not ``layers.Attention``'s ``to_q``...), scaled by head_dim^-1/2."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = self.hidden_size // self.num_heads
        split = lambda y: y.reshape(y.shape[:-1] + (self.num_heads, head_dim))  # noqa: E731
        q, k, v = (split(layers.dense(self.hidden_size, name, **kw)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = layers.attention(q, k, v, mask)
        return layers.dense(self.hidden_size, "out_proj", **kw)(out.reshape(out.shape[:-2] + (-1,)))


class CLIPMLP(nn.Module):
    """``fc1`` -> activation -> ``fc2``."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.hf_activation(self.hidden_act)(layers.dense(self.intermediate_size, "fc1", **kw)(x))
        return layers.dense(self.hidden_size, "fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm("layer_norm1", self.layer_norm_eps, **kw)(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, name="self_attn", **kw)(h, mask)
        h = layers.layer_norm("layer_norm2", self.layer_norm_eps, **kw)(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """``layers_N``; returns the input and every layer's output (``hidden_states``)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask):
        hidden_states = [h]
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.hidden_size, self.num_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, self.dtype, self.param_dtype, name=f"layers_{i}")(h, mask)
            hidden_states.append(h)
        return tuple(hidden_states)


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel`` body (``text_model``): ``embeddings``, ``encoder``,
    ``final_layer_norm`` and eos pooling. Returns a :class:`CLIPTextOutput` without text_embeds."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        h = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, name="embeddings",
                               **kw)(input_ids)
        hidden_states = CLIPEncoder(self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size,
                                    self.hidden_act, self.layer_norm_eps, name="encoder", **kw)(
            h, causal_mask(input_ids.shape[-1], attention_mask))
        last = layers.layer_norm("final_layer_norm", self.layer_norm_eps, **kw)(hidden_states[-1])
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.eos_token_id)]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)


class CLIPTextEncoder(nn.Module):
    """A CLIP text tower: transformers' ``CLIPTextModel`` (``projection_dim=None``) or
    ``CLIPTextModelWithProjection`` (``projection_dim`` set: adds the bias-free ``text_projection``
    of the pooled output, ``text_embeds``). Defaults are OpenAI CLIP ViT-L/14's text tower; see the
    module docstring for the call and the pooling rule."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    projection_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = CLIPTextTransformer(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers,
                                  self.num_heads, self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
                                  self.eos_token_id, name="text_model", **kw)(input_ids, attention_mask)
        if self.projection_dim is None:
            return out
        text_embeds = layers.dense(self.projection_dim, "text_projection", use_bias=False, **kw)(out.pooler_output)
        return out.replace(text_embeds=text_embeds)
