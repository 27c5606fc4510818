"""Building blocks shared by every model family.

Submodule names follow diffusers' attribute names (``to_q``, ``linear_1``,
``to_out_0`` for ``to_out.0``) so that the PyTorch -> Flax key map is the
generic rule in ``jdistill.convert.engine`` plus a few renames per family.

All modules take ``dtype`` (compute) and ``param_dtype`` (storage)
separately, so bf16 compute over fp32 params is one argument away.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0):
    """Sinusoidal features of (possibly fractional) timesteps, exactly as diffusers'
    ``get_timestep_embedding``: frequencies exp(-log(max_period) i / (half - freq_shift)),
    [sin, cos] (or [cos, sin] with ``flip_sin_to_cos``), zero-padded to odd ``dim``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_scale_embedding(guidance_scale, dim: int):
    """LCM's embedding of the guidance scale, a w-conditioned UNet's ``timestep_cond``: sinusoidal
    features of 1000 w with w = guidance_scale - 1 (Meng et al.'s w), computed in the order of
    diffusers' LatentConsistencyModelPipeline ``get_guidance_scale_embedding`` (not
    :func:`timestep_embedding`'s). The phases reach thousands of radians (w = 7: 7000), where one
    float32 ulp of a frequency, which XLA's and torch's ``exp`` can differ by, is 5e-4 rad: the
    features agree with diffusers' to that, not to float32 rounding."""
    w = (jnp.asarray(guidance_scale, jnp.float32).reshape(-1) - 1.0) * 1000.0
    half = dim // 2
    step = jnp.log(jnp.float32(10000.0)) / (half - 1)
    emb = w[:, None] * jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, 1))) if dim % 2 else emb


def activation(name: str):
    fns = {
        "silu": nn.silu, "swish": nn.silu, "gelu": partial(nn.gelu, approximate=False),
        "gelu_tanh": partial(nn.gelu, approximate=True), "gelu-approximate": partial(nn.gelu, approximate=True),
        "relu": nn.relu, "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    }
    if name not in fns:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(fns)}")
    return fns[name]


def dense(features: int, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: int | None = None, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    """PyTorch-style Conv2d on NHWC: symmetric integer padding (default kernel // 2)."""
    p = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def group_norm(groups: int, name: str, eps: float = 1e-5, affine: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    # two-pass variance, as PyTorch computes it (the fast E[x^2] - E[x]^2 drifts by 1e-5)
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_bias=affine, use_scale=affine, dtype=dtype,
                        param_dtype=param_dtype, use_fast_variance=False, name=name)


def layer_norm(name: str, eps: float = 1e-5, affine: bool = True, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class RMSNorm(nn.Module):
    """diffusers' / T5's RMSNorm: x / sqrt(mean(x^2) + eps) * weight (param ``weight``)."""

    eps: float = 1e-6
    affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.affine:
            y = y * self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return y.astype(self.dtype)


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding``: linear_1 -> act -> linear_2."""

    dim: int
    out_dim: int | None = None
    act: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.dim, "linear_1", **kw)(x)
        x = activation(self.act)(x)
        return dense(self.out_dim or self.dim, "linear_2", **kw)(x)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention on (B, T, heads, head_dim) through ``jax.nn.dot_product_attention``
    (XLA picks a fused kernel where the backend has one)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


class Attention(nn.Module):
    """diffusers' ``Attention`` (self or cross): to_q / to_k / to_v / to_out_0.

    ``qk_norm``: None, "layer_norm" or "rms_norm" over each head (norm_q / norm_k),
    as SD3 / SD3.5 use. Inputs are (B, T, C) tokens.
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    bias: bool = False
    out_bias: bool = True
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        self.to_q = dense(inner, "to_q", self.bias, **kw)
        self.to_k = dense(inner, "to_k", self.bias, **kw)
        self.to_v = dense(inner, "to_v", self.bias, **kw)
        self.to_out_0 = dense(self.out_dim or inner, "to_out_0", self.out_bias, **kw)
        if self.qk_norm == "layer_norm":
            self.norm_q = layer_norm("norm_q", self.qk_norm_eps, **kw)
            self.norm_k = layer_norm("norm_k", self.qk_norm_eps, **kw)
        elif self.qk_norm == "rms_norm":
            self.norm_q = RMSNorm(self.qk_norm_eps, name="norm_q", **kw)
            self.norm_k = RMSNorm(self.qk_norm_eps, name="norm_k", **kw)
        elif self.qk_norm is not None:
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}")

    def heads_of(self, x):
        return x.reshape(x.shape[:-1] + (self.heads, self.dim_head))

    def qkv(self, x, context=None):
        """Projected (q, k, v) as (B, T, heads, dim_head), with the optional qk norm."""
        context = x if context is None else context
        q, k, v = (self.heads_of(f(y)) for f, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.qk_norm is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def __call__(self, x, context=None, mask=None):
        q, k, v = self.qkv(x, context)
        out = attention(q, k, v, mask)
        return self.to_out_0(out.reshape(out.shape[:2] + (-1,)))


def fuse(h, control):
    """A backbone feature ``h`` under an adapter's ``control``: None leaves it; an array is a
    residual added to it (ControlNet's zero-initialised residuals); a pair ``(a, mu)`` is the
    gated fusion (1 - mu) h + mu a of CoDi (Mei et al.), written h + mu (a - h)."""
    if control is None:
        return h
    if isinstance(control, (tuple, list)):
        a, mu = control
        return h + jnp.asarray(mu, h.dtype) * (a.astype(h.dtype) - h)
    return h + control.astype(h.dtype)


class GuidanceEmbedding(nn.Module):
    """Embedding of a guidance weight for guidance-conditioned students (Meng et al.):
    sinusoidal features of ``scale * w`` -> linear_1 -> SiLU -> linear_2, the last layer
    zero-initialised so that adding it to the timestep embedding leaves a teacher-initialised
    student exactly equal to its teacher at step 0."""

    dim: int
    freq_dim: int = 256
    scale: float = 100.0  # w in [0, 10] spans the range timesteps 0..1000 do
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, w):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w = jnp.asarray(w, jnp.float32).reshape(-1)  # (B,)
        h = timestep_embedding(self.scale * w, self.freq_dim, flip_sin_to_cos=True, freq_shift=0.0)
        h = nn.silu(dense(self.dim, "linear_1", **kw)(h.astype(self.dtype)))
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros,
                        name="linear_2")(h)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int | None = None,
                        interpolation_scale: float = 1.0):
    """The fixed 2D sin-cos position table of ViT-style patch embedders (DiT, PixArt, SD3), as a
    float32 numpy array (grid_h * grid_w, dim), tokens in row-major (h, w) order.

    The first half of the channels encodes the column (w) coordinate, the second half the
    row (h) coordinate, each as [sin, cos] over frequencies 10000^(-i / (dim / 4)); this is
    the order of the original DiT / MAE code and of diffusers' ``get_2d_sincos_pos_embed``.
    Positions are ``arange(n) / (n / base_size) / interpolation_scale`` (diffusers' rule for
    sizes other than the training size; the identity at ``n == base_size``, the default).
    The table is built in float64 and rounded once, as both references do, so a table stored
    in a checkpoint can be compared with it to the last bit.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position table needs dim divisible by 4, got {dim}")

    def positions(n):
        base = n if base_size is None else base_size
        return np.arange(n, dtype=np.float32) / np.float32(n / base) / np.float32(interpolation_scale)

    def axis_table(pos):  # (M,) -> (M, dim // 2)
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w_coord, h_coord = np.meshgrid(positions(grid_w), positions(grid_h), indexing="xy")  # each (grid_h, grid_w)
    table = np.concatenate([axis_table(w_coord.reshape(-1)), axis_table(h_coord.reshape(-1))], axis=1)
    return table.astype(np.float32)


# transformers' ACT2FN names -> ``activation`` names, for configs written by transformers
# (CLIP's ``hidden_act``, T5's ``dense_act_fn``). Only names whose formula is exactly one
# of ours are listed: "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are all the tanh
# approximation, "gelu" the exact erf form.
HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu",
    "swish": "silu", "mish": "mish",
}


def hf_activation(name: str):
    """The activation function a transformers config names (``ACT2FN`` key)."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"transformers activation {name!r} not supported; known: {sorted(HF_ACTIVATIONS)}")
    return activation(HF_ACTIVATIONS[name])


def modulate(x, shift, scale):
    """adaLN modulation ``x * (1 + scale) + shift`` of tokens (B, T, C) by (B, C) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """The conditioning of adaLN-Zero blocks with the embedding passed in (diffusers'
    ``AdaLayerNormZero`` without its own embedder; with ``chunks=9``, SD3.5's
    ``SD35AdaLayerNormZeroX``): SiLU(emb) -> ``linear`` to ``chunks * dim``, split into
    ``chunks`` (B, dim) vectors in diffusers' order (shift, scale, gate of the attention,
    the same for the MLP, then for the second attention), and a parameter-free LayerNorm.

    Returns ``(LayerNorm(x), chunks)``; the caller modulates (``modulate``), because the
    SD3.5 variant modulates the same normalised tokens twice. ``linear`` starts at zero,
    so a freshly initialised block is the identity (the "Zero" of adaLN-Zero).
    """

    dim: int
    chunks: int = 6
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        mod = nn.Dense(self.chunks * self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=nn.initializers.zeros, name="linear")(nn.silu(emb))
        h = layer_norm("norm", self.eps, affine=False, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return h, tuple(jnp.split(mod, self.chunks, axis=-1))


class AdaLayerNormContinuous(nn.Module):
    """diffusers' ``AdaLayerNormContinuous`` (SD3 / Flux output norm, SD3's last text-stream
    norm): SiLU(cond) -> ``linear`` to 2 dim, split as (scale, shift) -- the reverse of
    adaLN-Zero's (shift, scale) order -- then ``norm(x) * (1 + scale) + shift``.

    ``norm_type`` "layer_norm" (with ``elementwise_affine``, a weight and, with ``bias``, a
    bias) or "rms_norm"; ``bias`` is also the linear's, as in diffusers. ``linear`` starts at zero.
    """

    dim: int
    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True
    norm_type: str = "layer_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = nn.Dense(2 * self.dim, use_bias=self.bias, kernel_init=nn.initializers.zeros, name="linear",
                       **kw)(nn.silu(cond).astype(self.dtype))
        scale, shift = jnp.split(emb, 2, axis=-1)
        if self.norm_type == "layer_norm":
            norm = nn.LayerNorm(epsilon=self.eps, use_scale=self.elementwise_affine,
                                use_bias=self.elementwise_affine and self.bias, use_fast_variance=False,
                                name="norm", **kw)
        elif self.norm_type == "rms_norm":
            norm = RMSNorm(self.eps, self.elementwise_affine, name="norm", **kw)
        else:
            raise ValueError(f"unknown norm_type {self.norm_type!r}; known: 'layer_norm', 'rms_norm'")
        return modulate(norm(x), shift, scale)
