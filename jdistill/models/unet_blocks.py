"""UNet building blocks shared by diffusers' UNet families (NHWC).

The pixel ``UNet2DModel`` is built from these; the conditional UNet, ControlNet
and the VAE encoder / decoder are meant to be built from the same pieces:

* :class:`ResnetBlock2D` with or without a time embedding (the VAE passes
  ``temb=None`` and then has no ``time_emb_proj``), "default" or "scale_shift"
  time conditioning, and an optional nearest-up / average-pool-down resample
  inside the block (diffusers' ``up=True`` / ``down=True``);
* :class:`Downsample2D` / :class:`Upsample2D` (strided conv or average pool;
  nearest x2 or to an explicit ``output_size``, then an optional conv);
* :class:`SpatialSelfAttention`: diffusers' ``Attention`` as the UNet and VAE
  blocks build it (group norm over the feature map, self-attention over its
  pixels, residual connection, output rescale), on ``layers.Attention``'s
  projections;
* :class:`DownBlock2D` / :class:`UpBlock2D` / :class:`UNetMidBlock2D`: a stack
  of resnets with one optional attention module after each, then an optional
  resampler. Which attention follows resnet ``i`` is decided by the
  overridable method ``attention(i, channels)`` (``None`` by default), so
  ``AttnDownBlock2D`` is a three-line subclass and the cross-attention blocks
  (``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` / ``UNetMidBlock2DCrossAttn``:
  a :class:`Transformer2DModel` after each resnet) are one more override, fed
  by the ``attention_kwargs`` every block forwards (``encoder_hidden_states=...``);
* :class:`Transformer2DModel` / :class:`BasicTransformerBlock` / GEGLU
  :class:`FeedForward`: Stable Diffusion's spatial transformer, on
  ``layers.Attention`` for its self- and cross-attention.

Submodules carry diffusers' attribute names (``resnets_0``, ``attentions_0``,
``downsamplers_0/conv``, ``norm1``, ``time_emb_proj``, ``to_out_0``, ...), so
``convert/engine.py``'s generic rule maps every key of these blocks.

Channel counts are read from the input where diffusers asks for them
(``in_channels``, ``prev_output_channel``): a block only needs its output
width. The VAE's encoder / decoder blocks are these blocks used without a time
embedding (``DownEncoderBlock2D`` = ``DownBlock2D(...)(x)`` with the skip states
ignored) and, on the way up, without skip states (``UpDecoderBlock2D`` =
``UpBlock2D(...)(x)``; ``AttnUpDecoderBlock2D`` = ``AttnUpBlock2D(...)(x)``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdistill.models import layers
from jdistill.train import partitioning

Dtype = Any

TIME_EMBEDDING_NORMS = ("default", "scale_shift")
RESAMPLE_TYPES = ("conv", "resnet")


def upsample_nearest(x, output_size: tuple[int, int] | None = None):
    """PyTorch's ``F.interpolate(mode="nearest")`` on NHWC: x2, or to ``output_size`` (H, W)
    with source index floor(i * in / out) computed in float32, as PyTorch's CPU and CUDA
    kernels do (so odd sizes pick the same rows)."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    for axis, out in zip((1, 2), output_size):
        size = x.shape[axis]
        if out == size:
            continue
        if out == 2 * size:
            idx = np.arange(out) // 2
        else:
            scale = np.float32(size) / np.float32(out)
            idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), size - 1)
        x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


def avg_pool_2x2(x):
    """``nn.AvgPool2d(2, 2)``: an odd trailing row / column is dropped, as in PyTorch."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Downsample2D(nn.Module):
    """diffusers' ``Downsample2D``: a stride-2 conv (param ``conv``), or a 2x2 average pool
    without params (``use_conv=False``). ``padding=0`` pads one row / column at the bottom /
    right only, as diffusers does, so even sizes halve exactly."""

    out_channels: int | None = None
    use_conv: bool = True
    padding: int = 1
    kernel_size: int = 3
    bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = self.out_channels or x.shape[-1]
        if not self.use_conv:
            if channels != x.shape[-1]:
                raise ValueError(f"average-pool Downsample2D keeps the {x.shape[-1]} channels, "
                                 f"got out_channels={channels}")
            return avg_pool_2x2(x)
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return nn.Conv(channels, (self.kernel_size, self.kernel_size), strides=(2, 2), padding=pad, use_bias=self.bias,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """diffusers' ``Upsample2D`` (interpolating form): nearest x2 (or to ``output_size``),
    then a 3x3 conv (param ``conv``) when ``use_conv``. The transposed-conv form is not
    implemented (no UNet / VAE of diffusers' SD families uses it)."""

    out_channels: int | None = None
    use_conv: bool = True
    kernel_size: int = 3
    padding: int = 1
    bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        x = upsample_nearest(x, output_size)
        if not self.use_conv:
            return x
        return layers.conv(self.out_channels or x.shape[-1], self.kernel_size, "conv", padding=self.padding,
                           use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)(x)


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (params ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``,
    ``conv2``, ``conv_shortcut``).

    ``time_embedding_norm``: "default" adds the projected embedding before ``norm2``;
    "scale_shift" projects to 2C and applies ``norm2(h) * (1 + scale) + shift``.
    ``time_emb_proj`` exists only when the block is called with a ``temb`` (a VAE block is
    called without one). ``resample``: None, "up" (nearest x2) or "down" (2x2 average pool),
    applied to both branches after ``norm1`` (diffusers' ``up=True`` / ``down=True``).
    The 1x1 ``conv_shortcut`` is there when the input width differs from the output width,
    or when ``use_in_shortcut`` forces it.
    """

    out_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    conv_shortcut_bias: bool = True
    conv_2d_out_channels: int | None = None
    resample: str | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        if self.time_embedding_norm not in TIME_EMBEDDING_NORMS:
            # "spatial" / "ada_group" are diffusers' ResnetBlockCondNorm2D, a different block
            raise ValueError(f"ResnetBlock2D time_embedding_norm {self.time_embedding_norm!r} is not supported "
                             f"(supported: {TIME_EMBEDDING_NORMS})")
        if self.resample not in (None, "up", "down"):
            raise ValueError(f"ResnetBlock2D resample must be None, 'up' or 'down', got {self.resample!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = layers.activation(self.act_fn)
        in_ch = x.shape[-1]
        out_ch = self.out_channels or in_ch
        final_ch = self.conv_2d_out_channels or out_ch
        x = partitioning.constrain_batch(x)

        h = act(layers.group_norm(self.groups, "norm1", self.eps, **kw)(x))
        if self.resample == "up":
            x, h = upsample_nearest(x), upsample_nearest(h)
        elif self.resample == "down":
            x, h = avg_pool_2x2(x), avg_pool_2x2(h)
        h = layers.conv(out_ch, 3, "conv1", **kw)(h)

        if temb is not None:
            t = temb if self.skip_time_act else act(temb)
            width = 2 * out_ch if self.time_embedding_norm == "scale_shift" else out_ch
            t = layers.dense(width, "time_emb_proj", **kw)(t)[:, None, None, :]
        elif self.time_embedding_norm == "scale_shift":
            raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs a time embedding")

        norm2 = layers.group_norm(self.groups_out or self.groups, "norm2", self.eps, **kw)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h if temb is None else h + t)
        h = act(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = layers.conv(final_ch, 3, "conv2", **kw)(h)

        use_shortcut = in_ch != final_ch if self.use_in_shortcut is None else self.use_in_shortcut
        if use_shortcut:
            x = layers.conv(final_ch, 1, "conv_shortcut", use_bias=self.conv_shortcut_bias, **kw)(x)
        return layers.materialize_cotangent((x + h) / self.output_scale_factor)


class SpatialSelfAttention(layers.Attention):
    """diffusers' ``Attention`` as its UNet / VAE blocks build it (``_from_deprecated_attn_block``):
    optional ``group_norm`` over the feature map, self-attention over the H*W pixels with
    ``to_q`` / ``to_k`` / ``to_v`` / ``to_out_0`` (biased), plus the input, divided by
    ``rescale_output_factor``. NHWC in and out.

    ``heads * dim_head`` may be smaller than the channel count (diffusers uses
    ``channels // attention_head_dim`` heads); pass ``out_dim=channels``.
    """

    norm_groups: int | None = 32
    norm_eps: float = 1e-5
    rescale_output_factor: float = 1.0
    residual_connection: bool = True

    def setup(self):
        super().setup()
        if self.norm_groups is not None:
            self.group_norm = layers.group_norm(self.norm_groups, "group_norm", self.norm_eps, dtype=self.dtype,
                                                param_dtype=self.param_dtype)

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        normed = self.group_norm(tokens) if self.norm_groups is not None else tokens
        q, k, v = self.qkv(normed)
        out = layers.attention(q, k, v)
        out = self.to_out_0(out.reshape(b, h * w, -1)).reshape(b, h, w, -1)
        if self.residual_connection:
            out = out + x
        return layers.materialize_cotangent(out / self.rescale_output_factor)


def spatial_attention(channels: int, head_dim: int | None, groups: int | None, eps: float,
                      rescale_output_factor: float, name: str, dtype: Dtype, param_dtype: Dtype):
    """The attention diffusers' Attn*Block2D / UNetMidBlock2D put after a resnet:
    ``channels // head_dim`` heads (one head of width ``channels`` when ``head_dim`` is None)."""
    head_dim = head_dim or channels
    heads = channels // head_dim
    if heads < 1:
        raise ValueError(f"attention_head_dim {head_dim} is wider than the {channels} channels it attends over")
    return SpatialSelfAttention(heads=heads, dim_head=head_dim, out_dim=channels, bias=True, norm_groups=groups,
                                norm_eps=eps, rescale_output_factor=rescale_output_factor, dtype=dtype,
                                param_dtype=param_dtype, name=name)


class _ResnetStack(nn.Module):
    """Fields and helpers every UNet block shares: how its resnets are built, and the
    ``attention(i, channels)`` hook subclasses override to put a module after resnet ``i``.

    ``out_channels=None`` keeps the input width (the mid block).
    """

    out_channels: int | None = None
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    resnet_act_fn: str = "silu"
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    remat: str = "none"  # of each resnet and transformer block: layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, name: str, out_channels: int | None = None, resample: str | None = None) -> ResnetBlock2D:
        # static_argnums: ``deterministic`` (self is argument 0)
        block = layers.remat(ResnetBlock2D, self.remat, static_argnums=(3,))
        return block(out_channels=out_channels or self.out_channels, groups=self.resnet_groups,
                     eps=self.resnet_eps, act_fn=self.resnet_act_fn,
                     time_embedding_norm=self.resnet_time_scale_shift, skip_time_act=self.resnet_skip_time_act,
                     output_scale_factor=self.output_scale_factor, resample=resample, dropout=self.dropout,
                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def attention(self, index: int, channels: int) -> nn.Module | None:
        """The module applied after resnet ``index`` (named ``attentions_{index}``), or None.
        It is called as ``module(x, **attention_kwargs)``."""
        return None

    def _attend(self, index, x, attention_kwargs):
        attn = self.attention(index, x.shape[-1])
        return x if attn is None else attn(x, **(attention_kwargs or {}))


class DownBlock2D(_ResnetStack):
    """diffusers' ``DownBlock2D`` / ``ResnetDownsampleBlock2D`` (``downsample_type="resnet"``),
    and with ``temb=None`` the VAE's ``DownEncoderBlock2D``.

    Returns ``(x, skip_states)``: the output of every resnet (after its attention) and of the
    downsampler, which the matching up block consumes in reverse.
    """

    add_downsample: bool = True
    downsample_type: str = "conv"  # "conv": strided conv; "resnet": a ResnetBlock2D(down=True)
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb=None, *, deterministic: bool = True, attention_kwargs: dict | None = None):
        states = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self._attend(i, x, attention_kwargs)
            states.append(x)
        if self.add_downsample:
            if self.downsample_type == "conv":
                x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="downsamplers_0")(x)
            elif self.downsample_type == "resnet":
                x = self.resnet("downsamplers_0", resample="down")(x, temb, deterministic)
            else:
                raise ValueError(f"downsample_type {self.downsample_type!r} is not supported "
                                 f"(supported: {RESAMPLE_TYPES})")
            states.append(x)
        return x, tuple(states)


class AttnDownBlock2D(DownBlock2D):
    """diffusers' ``AttnDownBlock2D`` (with ``temb=None``: ``AttnDownEncoderBlock2D``):
    a :class:`SpatialSelfAttention` after every resnet, group-normed with the resnets' groups."""

    attention_head_dim: int | None = 1

    def attention(self, index, channels):
        return spatial_attention(channels, self.attention_head_dim, self.resnet_groups, self.resnet_eps,
                                 self.output_scale_factor, f"attentions_{index}", self.dtype, self.param_dtype)


class UpBlock2D(_ResnetStack):
    """diffusers' ``UpBlock2D`` / ``ResnetUpsampleBlock2D`` (``upsample_type="resnet"``).

    Each resnet first concatenates (on channels) the last remaining entry of ``res_states``,
    as diffusers pops ``res_hidden_states_tuple[-1]``. Called with ``res_states=None`` the
    block has no skips: the VAE's ``UpDecoderBlock2D``. ``output_size`` (H, W) forces the
    conv upsampler's size (the conditional UNet passes it for odd latents).
    """

    add_upsample: bool = True
    upsample_type: str = "conv"  # "conv": nearest x2 + conv; "resnet": a ResnetBlock2D(up=True)

    @nn.compact
    def __call__(self, x, res_states=None, temb=None, *, output_size: tuple[int, int] | None = None,
                 deterministic: bool = True, attention_kwargs: dict | None = None):
        if res_states is not None and len(res_states) != self.num_layers:
            raise ValueError(f"up block with {self.num_layers} resnets got {len(res_states)} skip states")
        skips = list(res_states) if res_states is not None else None
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb, deterministic)
            x = self._attend(i, x, attention_kwargs)
        if self.add_upsample:
            if self.upsample_type == "conv":
                x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="upsamplers_0")(x, output_size)
            elif self.upsample_type == "resnet":
                # diffusers' resnet upsampler ignores upsample_size: always x2
                x = self.resnet("upsamplers_0", resample="up")(x, temb, deterministic)
            else:
                raise ValueError(f"upsample_type {self.upsample_type!r} is not supported "
                                 f"(supported: {RESAMPLE_TYPES})")
        return x


class AttnUpBlock2D(UpBlock2D):
    """diffusers' ``AttnUpBlock2D`` (without skips: ``AttnUpDecoderBlock2D``)."""

    attention_head_dim: int | None = 1

    def attention(self, index, channels):
        return spatial_attention(channels, self.attention_head_dim, self.resnet_groups, self.resnet_eps,
                                 self.output_scale_factor, f"attentions_{index}", self.dtype, self.param_dtype)


class UNetMidBlock2D(_ResnetStack):
    """diffusers' ``UNetMidBlock2D``: ``resnets_0``, then ``num_layers`` x (attention, resnet),
    at the input's width. ``output_scale_factor`` divides both the resnets' and the
    attentions' outputs.

    ``attn_groups`` follows diffusers: None means the resnets' groups under "default" time
    conditioning and *no* group norm in the attention under "scale_shift".
    With ``temb=None`` it is the VAE's mid block.
    """

    add_attention: bool = True
    attention_head_dim: int | None = 1
    attn_groups: int | None = None

    def attention(self, index, channels):
        if not self.add_attention:
            return None
        groups = self.attn_groups
        if groups is None and self.resnet_time_scale_shift == "default":
            groups = self.resnet_groups
        return spatial_attention(channels, self.attention_head_dim, groups, self.resnet_eps,
                                 self.output_scale_factor, f"attentions_{index}", self.dtype, self.param_dtype)

    @nn.compact
    def __call__(self, x, temb=None, *, deterministic: bool = True, attention_kwargs: dict | None = None):
        x = self.resnet("resnets_0")(x, temb, deterministic)
        for i in range(self.num_layers):
            x = self._attend(i, x, attention_kwargs)
            x = self.resnet(f"resnets_{i + 1}")(x, temb, deterministic)
        return x


# --- cross-attention: Stable Diffusion's transformer after each resnet ---------------------

class GEGLU(nn.Module):
    """diffusers' ``GEGLU`` (``ff.net.0``): ``proj`` to 2 x ``features``, split into a value
    half and a gate half, value * GELU(gate) with the exact (erf) GELU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = layers.dense(2 * self.features, "proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * layers.activation("gelu")(gate)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` as every Stable Diffusion transformer block builds it:
    ``net_0`` (GEGLU to ``mult`` x the width) then ``net_2`` back to the width (``net.1`` is
    a dropout the UNet blocks leave at 0: no weights)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return layers.dense(x.shape[-1], "net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` with the "layer_norm" norms Stable Diffusion uses:
    pre-norm self-attention (``norm1``, ``attn1``), cross-attention to the text tokens
    (``norm2``, ``attn2``) and a GEGLU feed-forward (``norm3``, ``ff``), each residual.
    Projections have no bias except the output ones, as in diffusers' defaults.

    ``only_cross_attention``: ``attn1`` attends to the text tokens too (diffusers' option of
    that name). Tokens are (B, T, C); ``context`` is (B, S, D).
    """

    heads: int
    dim_head: int
    only_cross_attention: bool = False
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        x = partitioning.constrain_batch(x)

        def attention(name):
            return layers.Attention(self.heads, self.dim_head, out_dim=dim, name=name, **kw)

        h = layers.layer_norm("norm1", self.norm_eps, **kw)(x)
        x = x + attention("attn1")(h, context if self.only_cross_attention else None)
        h = layers.layer_norm("norm2", self.norm_eps, **kw)(x)
        x = x + attention("attn2")(h, context)
        h = layers.layer_norm("norm3", self.norm_eps, **kw)(x)
        return layers.materialize_cotangent(x + FeedForward(name="ff", **kw)(h))


class Transformer2DModel(nn.Module):
    """diffusers' ``Transformer2DModel`` on a continuous feature map, as the cross-attention
    UNet blocks build it: group norm (eps 1e-6), ``proj_in`` (a 1x1 conv, or a linear over the
    tokens with ``use_linear_projection`` as SD 2.x / SDXL do), ``num_layers``
    :class:`BasicTransformerBlock` over the H*W tokens, ``proj_out`` back, plus the input.
    NHWC in and out; ``encoder_hidden_states`` (B, S, D) are the text tokens.

    ``upcast_attention`` (SD 2.1) asks PyTorch to compute attention scores in float32 under
    fp16; ``jax.nn.dot_product_attention`` always forms its logits and softmax in float32,
    so the flag is accepted and changes nothing here.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    remat: str = "none"  # of each BasicTransformerBlock: layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            raise ValueError("a cross-attention block needs encoder_hidden_states (B, S, D)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        h = layers.group_norm(self.norm_groups, "norm", 1e-6, **kw)(x)
        # a 1x1 conv is a linear map over channels: both forms act per pixel, only the
        # stored kernel's shape differs
        if self.use_linear_projection:
            h = layers.dense(inner, "proj_in", **kw)(h.reshape(b, height * width, channels))
        else:
            h = layers.conv(inner, 1, "proj_in", **kw)(h).reshape(b, height * width, inner)
        block = layers.remat(BasicTransformerBlock, self.remat)
        for i in range(self.num_layers):
            h = block(self.heads, self.dim_head, self.only_cross_attention, name=f"transformer_blocks_{i}",
                      **kw)(h, encoder_hidden_states)
        if self.use_linear_projection:
            h = layers.dense(channels, "proj_out", **kw)(h).reshape(b, height, width, channels)
        else:
            h = layers.conv(channels, 1, "proj_out", **kw)(h.reshape(b, height, width, inner))
        return layers.materialize_cotangent(h + x)


class _CrossAttention(_ResnetStack):
    """The ``attention`` hook of the cross-attention blocks: a :class:`Transformer2DModel`
    after resnet ``i``, with ``num_attention_heads`` heads of width channels // heads, group-
    normed with the resnets' groups, of ``transformer_layers_per_block`` layers (an int, or
    one count per resnet as SDXL-style asymmetric configs give). The blocks are called with
    ``attention_kwargs={"encoder_hidden_states": tokens}``."""

    num_attention_heads: int = 1
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    def attention(self, index, channels):
        depth = self.transformer_layers_per_block
        depth = depth if isinstance(depth, int) else depth[index]
        return Transformer2DModel(heads=self.num_attention_heads, dim_head=channels // self.num_attention_heads,
                                  num_layers=depth, norm_groups=self.resnet_groups,
                                  use_linear_projection=self.use_linear_projection,
                                  only_cross_attention=self.only_cross_attention,
                                  upcast_attention=self.upcast_attention, remat=self.remat, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"attentions_{index}")


class CrossAttnDownBlock2D(_CrossAttention, DownBlock2D):
    """diffusers' ``CrossAttnDownBlock2D``: resnet, then a transformer, ``num_layers`` times,
    then the conv downsampler."""


class CrossAttnUpBlock2D(_CrossAttention, UpBlock2D):
    """diffusers' ``CrossAttnUpBlock2D``: (skip concat, resnet, transformer) ``num_layers``
    times, then the conv upsampler (to ``output_size`` when given)."""


class UNetMidBlock2DCrossAttn(_CrossAttention, UNetMidBlock2D):
    """diffusers' ``UNetMidBlock2DCrossAttn``: ``resnets_0``, then ``num_layers`` x
    (transformer, resnet). ``output_scale_factor`` divides the resnets' outputs only; the
    spatial-attention fields of :class:`UNetMidBlock2D` do not apply."""
