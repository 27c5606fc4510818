"""diffusers' ``AutoencoderKL`` (the Stable Diffusion / SDXL / SD3 / Flux VAE) in Flax (NHWC),
from the shared blocks of ``unet_blocks`` used without a time embedding.

* ``encode(x) -> (mean, logvar)``: the moments of diffusers' ``DiagonalGaussianDistribution``,
  logvar clipped to [-30, 20] as there;
* :func:`sample_latents` (also ``AutoencoderKL.sample``): mean + exp(logvar / 2) * noise, the
  noise drawn from a key or given;
* ``decode(z)``; ``__call__(x)`` = decode(mean), or decode of a sample with ``key``;
* ``quant_conv`` / ``post_quant_conv`` when ``use_quant_conv`` / ``use_post_quant_conv``
  (SD3 / Flux VAEs have neither);
* the latent normalisation a diffusion model sees, from the config:
  ``scale_latents(z) = (z - shift_factor) * scaling_factor`` and its inverse
  ``unscale_latents`` (shift 0 when ``shift_factor`` is None, as for SD 1.x / 2.x / SDXL);
  with ``latents_mean`` / ``latents_std`` (Playground v2.5-style per-channel statistics)
  ``(z - mean) * scaling_factor / std``. ``latents_from_images`` / ``images_from_latents``
  are encode + scale and unscale + decode.

Supported blocks: ``DownEncoderBlock2D``, ``AttnDownEncoderBlock2D`` / ``UpDecoderBlock2D``,
``AttnUpDecoderBlock2D``; ``mid_block_add_attention``. Anything else raises a ValueError.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdistill.models import layers
from jdistill.models.unet_blocks import AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, UNetMidBlock2D, UpBlock2D

Dtype = Any

DOWN_BLOCKS = {"DownEncoderBlock2D": DownBlock2D, "AttnDownEncoderBlock2D": AttnDownBlock2D}
UP_BLOCKS = {"UpDecoderBlock2D": UpBlock2D, "AttnUpDecoderBlock2D": AttnUpBlock2D}
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
VAE_EPS = 1e-6  # every norm of diffusers' VAE encoder / decoder


def sample_latents(mean, logvar, key: jax.Array | None = None, *, noise=None):
    """A draw from the diagonal Gaussian (mean, exp(logvar)): ``mean + exp(logvar / 2) * noise``
    with ``noise`` given or ~ N(0, 1) from ``key``."""
    if noise is None:
        if key is None:
            raise ValueError("sample_latents needs a key or the noise")
        noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * jnp.asarray(noise).astype(mean.dtype)


def _blocks(types, table, kind):
    for name in types:
        if name not in table:
            raise ValueError(f"AutoencoderKL: {kind} block type {name!r} is not supported (supported: {list(table)})")
    return [table[name] for name in types]


class Encoder(nn.Module):
    """diffusers' VAE ``Encoder``: conv_in, down blocks (2 x stride-2 conv with the bottom /
    right padding of ``downsample_padding=0``), mid block, group norm, SiLU, conv_out to
    2 x ``latent_channels`` (mean | logvar)."""

    latent_channels: int = 4
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(resnet_eps=VAE_EPS, resnet_groups=self.norm_num_groups, resnet_act_fn=self.act_fn, **kw)
        n = len(self.block_out_channels)
        x = layers.conv(self.block_out_channels[0], 3, "conv_in", **kw)(x)
        for i, cls in enumerate(_blocks(self.down_block_types, DOWN_BLOCKS, "down")):
            width = self.block_out_channels[i]
            # the VAE's attention blocks use one head over all channels
            extra = {"attention_head_dim": width} if cls is AttnDownBlock2D else {}
            x, _ = cls(out_channels=width, num_layers=self.layers_per_block, add_downsample=i < n - 1,
                       downsample_padding=0, name=f"down_blocks_{i}", **common, **extra)(x)
        x = UNetMidBlock2D(num_layers=1, add_attention=self.mid_block_add_attention,
                           attention_head_dim=self.block_out_channels[-1], name="mid_block", **common)(x)
        x = nn.silu(layers.group_norm(self.norm_num_groups, "conv_norm_out", VAE_EPS, **kw)(x))
        return layers.conv(2 * self.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' VAE ``Decoder``: conv_in, mid block, up blocks (``layers_per_block + 1``
    resnets, no skips, nearest x2 + conv), group norm, SiLU, conv_out."""

    out_channels: int = 3
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(resnet_eps=VAE_EPS, resnet_groups=self.norm_num_groups, resnet_act_fn=self.act_fn, **kw)
        widths = self.block_out_channels[::-1]
        x = layers.conv(widths[0], 3, "conv_in", **kw)(z)
        x = UNetMidBlock2D(num_layers=1, add_attention=self.mid_block_add_attention, attention_head_dim=widths[0],
                           name="mid_block", **common)(x)
        for i, cls in enumerate(_blocks(self.up_block_types, UP_BLOCKS, "up")):
            extra = {"attention_head_dim": widths[i]} if cls is AttnUpBlock2D else {}
            x = cls(out_channels=widths[i], num_layers=self.layers_per_block + 1, add_upsample=i < len(widths) - 1,
                    name=f"up_blocks_{i}", **common, **extra)(x)
        x = nn.silu(layers.group_norm(self.norm_num_groups, "conv_norm_out", VAE_EPS, **kw)(x))
        return layers.conv(self.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``; fields are its config fields with its defaults.

    ``force_upcast`` and ``sample_size`` are recorded, not used (a precision hint for fp16
    pipelines, and the tile size of diffusers' tiled decoding, which is not implemented).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(f"AutoencoderKL: {len(self.down_block_types)} down_block_types, "
                             f"{len(self.up_block_types)} up_block_types and {n} block_out_channels must be as many")
        _blocks(self.down_block_types, DOWN_BLOCKS, "down")
        _blocks(self.up_block_types, UP_BLOCKS, "up")
        layers.activation(self.act_fn)
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("AutoencoderKL: latents_mean and latents_std come together")
        if self.latents_mean is not None:
            if self.shift_factor is not None:
                raise ValueError("AutoencoderKL: shift_factor and latents_mean / latents_std are two normalisations "
                                 "of the latents; give one")
            for name in ("latents_mean", "latents_std"):
                if len(getattr(self, name)) != self.latent_channels:
                    raise ValueError(f"AutoencoderKL: {name} needs {self.latent_channels} entries (latent_channels)")
        super().__post_init__()

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                      mid_block_add_attention=self.mid_block_add_attention, **kw)
        self.encoder = Encoder(self.latent_channels, self.down_block_types, **blocks)
        self.decoder = Decoder(self.out_channels, self.up_block_types, **blocks)
        if self.use_quant_conv:
            self.quant_conv = layers.conv(2 * self.latent_channels, 1, "quant_conv", **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = layers.conv(self.latent_channels, 1, "post_quant_conv", **kw)

    def encode(self, x):
        """NHWC images -> ``(mean, logvar)`` of the posterior, each with ``latent_channels``."""
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    sample = staticmethod(sample_latents)

    def decode(self, z):
        """NHWC latents (unscaled, as ``encode`` gives them) -> NHWC images."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, key: jax.Array | None = None):
        """Reconstruct: decode the posterior mean, or a sample from it when ``key`` is given
        (diffusers' ``forward(sample_posterior=...)``)."""
        mean, logvar = self.encode(x)
        return self.decode(mean if key is None else sample_latents(mean, logvar, key))

    # --- the latent space the diffusion model sees -----------------------------------------

    def _stats(self, z):
        if self.latents_mean is not None:
            mean = jnp.asarray(self.latents_mean, z.dtype)
            return mean, jnp.asarray(self.latents_std, z.dtype)
        return jnp.asarray(self.shift_factor or 0.0, z.dtype), None

    def scale_latents(self, z):
        """VAE latents -> diffusion latents: ``(z - shift_factor) * scaling_factor``, or
        ``(z - latents_mean) * scaling_factor / latents_std`` per channel. Uses only the config
        (no params): callable on an unbound module."""
        shift, std = self._stats(z)
        out = (z - shift) * self.scaling_factor
        return out if std is None else out / std

    def unscale_latents(self, latents):
        """The inverse of :meth:`scale_latents`: diffusion latents -> what ``decode`` takes."""
        shift, std = self._stats(latents)
        z = latents if std is None else latents * std
        return z / self.scaling_factor + shift

    def latents_from_images(self, images, key: jax.Array | None = None, *, noise=None):
        """NHWC images in [-1, 1] -> diffusion latents: a posterior sample (from ``key`` or the
        given ``noise``; the mean when neither is given), then :meth:`scale_latents`.
        ``vae.apply(params, images, key, method=vae.latents_from_images)``."""
        mean, logvar = self.encode(images)
        z = mean if key is None and noise is None else sample_latents(mean, logvar, key, noise=noise)
        return self.scale_latents(z)

    def images_from_latents(self, latents):
        """Diffusion latents -> NHWC images: :meth:`unscale_latents`, then decode."""
        return self.decode(self.unscale_latents(latents))
