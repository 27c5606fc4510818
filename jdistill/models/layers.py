"""Building blocks shared by every model family.

Submodule names follow diffusers' attribute names (``to_q``, ``linear_1``,
``to_out_0`` for ``to_out.0``) so that the PyTorch -> Flax key map is the
generic rule in ``jdistill.convert.engine`` plus a few renames per family.

All modules take ``dtype`` (compute) and ``param_dtype`` (storage)
separately, so bf16 compute over fp32 params is one argument away.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
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


REFERENCE_KERNELS = "JDISTILL_REFERENCE_KERNELS"  # environment variable: 1 = compute as before the CPU speed-ups


def reference_kernels() -> bool:
    """Whether the models and the train step compute as jdistill did before its CPU speed-ups
    (docs/performance.md): linears through plain ``dot_general``, attention through
    ``jax.nn.dot_product_attention``'s XLA path, no barrier-keeping compile option.

    Forward values are the same either way; training rounds differently (the speed-ups change
    the order of the backward's sums), so FD tables measured before them reproduce to the last
    digit only with ``JDISTILL_REFERENCE_KERNELS=1`` (on the processor they were measured on).
    Read when a step is traced, so set it before the first one."""
    return os.environ.get(REFERENCE_KERNELS, "") not in ("", "0")


def matmul_last_axis(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for :func:`dense`: the leading axes of ``x`` flattened into one, so that
    a linear layer on tokens (B, T, C) is one 2-D product (B T, C) x (C, F).

    Why: the kernel's gradient contracts the two axes (B, T) of x and of the output gradient,
    and XLA:CPU lowers a two-axis contraction through physical transposes of both operands.
    Fused with the elementwise backward of the layers before them (norms, gates, GELU), those
    transposes cost more than all the matmuls of a DiT train step. With x flattened, the
    gradient is one product with a transposed operand, which the CPU GEMM reads in place
    (docs/performance.md). On GPU and TPU the reshape of leading axes is free.
    """
    ((x_axes, k_axes), batch) = dimension_numbers
    if x.ndim <= 2 or batch != ((), ()) or tuple(x_axes) != (x.ndim - 1,) or reference_kernels():
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), k_axes), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
    return y.reshape(x.shape[:-1] + y.shape[1:])


def dense(features: int, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, **kwargs):
    """``nn.Dense`` (params ``kernel`` (in, out), ``bias``) computing through :func:`matmul_last_axis`;
    every linear layer of the models is made here. ``kwargs``: ``kernel_init`` and the like."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    dot_general=matmul_last_axis, **kwargs)


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


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def attention_implementation(q, k, v, mask=None, platform: str | None = None) -> str:
    """Which kernel :func:`attention` uses for these inputs on ``platform`` (default: JAX's default
    backend):

    * "cudnn" (``jax.nn.dot_product_attention``'s fused flash kernel) on NVIDIA GPUs, for the
      shapes and dtypes cuDNN takes: bf16 / fp16 inputs, head width <= 128 and a multiple of 8,
      no mask;
    * "einsum" (:func:`attention_einsum`) on CPU, where ``jax.nn.dot_product_attention``'s XLA
      path (a grouped-query 5-D form) ran 2-3x slower than the same math on 4-D arrays ("xla"
      under :func:`reference_kernels`);
    * "xla" (``jax.nn.dot_product_attention(implementation="xla")``) elsewhere (TPU; GPU shapes
      cuDNN refuses).
    """
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "xla" if reference_kernels() else "einsum"
    head = q.shape[-1]
    if (platform in ("gpu", "cuda") and _is_cuda() and mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.dtype == k.dtype == v.dtype and head <= 128 and head % 8 == 0 and k.shape[-1] == head):
        return "cudnn"
    return "xla"


def _is_cuda() -> bool:
    try:
        return "cuda" in jax.devices()[0].client.platform_version.lower()
    except (RuntimeError, AttributeError):
        return False


def attention(q, k, v, mask=None, implementation: str | None = None):
    """Scaled dot-product attention on (B, T, heads, head_dim) queries and (B, S, heads, head_dim)
    keys / values; ``mask`` (boolean, broadcasting to (B, heads, T, S)) is True where a query may
    attend. Logits and softmax in float32 whatever the input dtype. ``implementation``: one of
    ``ATTENTION_IMPLEMENTATIONS``, default :func:`attention_implementation`'s choice."""
    chosen = implementation or attention_implementation(q, k, v, mask)
    if chosen == "einsum":
        return _einsum_in_batch_chunks(q, k, v, mask)
    if chosen not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {chosen!r}; known: {ATTENTION_IMPLEMENTATIONS}")
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=chosen)
    except (NotImplementedError, ValueError):
        if implementation is not None or chosen != "cudnn":
            raise
        # a layout the installed cuDNN refuses (sequence lengths, compute capability): XLA's kernel
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


_PLANNING = contextvars.ContextVar("jdistill_planning", default=False)


@contextlib.contextmanager
def planning():
    """Trace steps as a pod runs them, not as this CPU does: ``jdistill plan`` compiles a pod's
    step on host CPU devices, and the CPU-only batch chunking of the einsum attention would enter
    its report (slices of a batch sharded over the mesh: the DiT-XL/2 plan's FLOPs rose 17%)."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


# float32 logits of one einsum call: above this, the batch is split (measured on a 2-core CPU: MMDiT's
# joint attention at batch 16, 28 MB of logits, ran 3.5x its batch-8 time in one call; each example's
# products are the same in any chunk, so values do not change)
EINSUM_LOGITS_BYTES = 16 << 20


def _einsum_in_batch_chunks(q, k, v, mask):
    b, t, heads, _ = q.shape
    per_example = t * k.shape[1] * heads * 4
    size = max(1, EINSUM_LOGITS_BYTES // per_example)
    # One device only: with several, the traced batch is the global one, sharded over them, and
    # slices of it cut across the shards (a measured 8-device DiT step allocated 3.5x its plan's
    # temp); under `jdistill plan` never (planning()).
    if size >= b or _PLANNING.get() or jax.device_count() > 1:
        return attention_einsum(q, k, v, mask)
    batched_mask = mask is not None and mask.shape[0] == b and b > 1
    outs = [attention_einsum(q[i:i + size], k[i:i + size], v[i:i + size],
                             mask[i:i + size] if batched_mask else mask) for i in range(0, b, size)]
    return jnp.concatenate(outs, axis=0)


def _masked_logits(q, k, mask):
    # the same products and order as jax.nn.dot_product_attention's XLA path, so forward values agree
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / np.sqrt(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.float32(-0.7 * np.finfo(np.float32).max))
    return logits


@jax.custom_vjp
def attention_einsum(q, k, v, mask=None):
    """Attention as two einsums around a float32 softmax, with a hand-written backward.

    The backward is flash attention's: dS = P * (dP - rowsum(dO * O)), so no reduction runs
    over the (T, S) probabilities and each of q, k, v gets its gradient from one product.
    """
    return _attention_einsum_fwd(q, k, v, mask)[0]


def _attention_einsum_fwd(q, k, v, mask):
    probs = jax.nn.softmax(_masked_logits(q, k, mask), axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
    return out, (q, k, v, mask, probs, out)


def _attention_einsum_bwd(res, d_out):
    q, k, v, mask, probs, out = res
    d_v = jnp.einsum("bnts,btnh->bsnh", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("btnh,bsnh->bnts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.einsum("btnh,btnh->bnt", d_out, out, preferred_element_type=jnp.float32)[..., None]
    d_logits = (probs * (d_probs - row) * jnp.float32(1.0 / np.sqrt(q.shape[-1]))).astype(q.dtype)
    d_q = jnp.einsum("bnts,bsnh->btnh", d_logits, k)
    d_k = jnp.einsum("bnts,btnh->bsnh", d_logits, q)
    d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return d_q, d_k, d_v, d_mask


attention_einsum.defvjp(_attention_einsum_fwd, _attention_einsum_bwd)


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
        return dense(self.dim, "linear_2", dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.zeros)(h)


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
        mod = dense(self.chunks * self.dim, "linear", dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.zeros)(nn.silu(emb))
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
        emb = dense(2 * self.dim, "linear", self.bias, kernel_init=nn.initializers.zeros,
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


# --- repeated blocks: cotangent materialisation, rematerialisation, scan -----------------------


@jax.custom_vjp
def materialize_cotangent(x):
    """The identity, whose gradient is stored once (behind an optimization barrier) instead of
    being recomputed by every consumer.

    Models call it on each block's output. Why: through a residual stream the gradient of block
    k's input is block k+1's plus elementwise terms (norm, modulation and gate backward). XLA:CPU
    fuses elementwise producers into all of their consumers when it can, so without a barrier
    each block's backward re-derived the gradient of every block above it, a chain of several
    hundred operations per element in the first block (docs/performance.md). The barrier only
    holds where the compiler keeps barriers until fusion: GPU and TPU do; XLA:CPU drops them
    early unless the step is compiled with ``jdistill.train.engine.compiler_options()``.
    """
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)

# what a rematerialised block keeps from its forward pass for the backward one
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: everything the backward reads is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep the block's input only, recompute the rest
    # keep the outputs of the linear layers, recompute norms, activations and attention
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(block_cls, policy: str, static_argnums: tuple[int, ...] = ()):
    """``block_cls`` wrapped in ``nn.remat`` under ``REMAT_POLICIES[policy]`` (``"none"``: unchanged).
    ``static_argnums`` counts ``self`` as 0, as ``nn.remat`` does."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


def block_runs(kinds) -> list[tuple[int, int]]:
    """[start, stop) of each maximal run of equal consecutive entries of ``kinds`` (one per block)."""
    runs, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            runs.append((start, i))
            start = i
    return runs


def scanned_name(prefix: str, start: int, stop: int) -> str:
    """The param name of blocks [start, stop) scanned as one module (their params stacked)."""
    return f"{prefix}_{start}_to_{stop - 1}"


def scan_blocks(block: nn.Module, length: int, carry: tuple, *broadcast):
    """``length`` copies of ``block`` applied in sequence by one ``nn.scan`` (one compiled body,
    params stacked on a leading axis). ``block(*carry, *broadcast)`` returns a tuple whose first
    ``len(carry)`` entries are the next carry; returns (carry, every block's outputs stacked)."""

    def body(module, state, *shared):
        out = module(*state, *shared)
        return tuple(out[:len(state)]), out

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * len(broadcast), length=length)
    return scan(block, tuple(carry), *broadcast)


def stack_blocks(params: dict, prefix: str, runs) -> dict:
    """Per-block params (``{prefix}_{i}``) -> the tree of a module scanning ``runs`` (runs of one
    block stay as they are). The inverse of :func:`unstack_blocks`."""
    out = dict(params)
    for start, stop in runs:
        if stop - start > 1:
            blocks = [out.pop(f"{prefix}_{i}") for i in range(start, stop)]
            out[scanned_name(prefix, start, stop)] = jax.tree.map(_stack, *blocks)
    return out


def _stack(*xs):
    # numpy stays numpy (converted checkpoints are numpy trees), anything else becomes a jax array
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def unstack_blocks(params: dict, prefix: str, runs) -> dict:
    """The tree of a module scanning ``runs`` -> per-block params, as checkpoints name them."""
    out = dict(params)
    for start, stop in runs:
        if stop - start > 1:
            stacked = out.pop(scanned_name(prefix, start, stop))
            for j, i in enumerate(range(start, stop)):
                out[f"{prefix}_{i}"] = jax.tree.map(lambda x, j=j: x[j], stacked)
    return out
