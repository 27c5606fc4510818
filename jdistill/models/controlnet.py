"""diffusers' ``ControlNetModel`` in Flax (NHWC): the encoder half of a conditional UNet
(:class:`jdistill.models.unet_cond.ConditionalEncoder`, the very code the UNet runs) with a
conditioning-image embedder added after ``conv_in``, and a zero-initialised 1x1 conv on every
skip state and on the mid block's output.

Its output ``(down_block_res_samples, mid_block_res_sample)`` is what
``UNet2DConditionModel`` takes as ``down_block_additional_residuals`` /
``mid_block_additional_residual``::

    down, mid = controlnet.apply(cn_params, z, t, text, image, conditioning_scale=0.8)
    eps = unet.apply(unet_params, z, t, text, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid)

Supported: everything ``ConditionalEncoder`` supports that diffusers' ControlNet builds
(SD 1.x / 2.x ControlNets, SDXL ControlNets with the "text_time" embedding, the class
embeddings but "simple_projection"), ``num_attention_heads``, "rgb" / "bgr" conditioning
channel order, ``global_pool_conditions``, guess mode. Refused: per-block ``layers_per_block``
or ``cross_attention_dim`` (diffusers' ControlNet takes single values), no mid block, and what
the conditional UNet refuses.

The zero convs and the embedder's ``conv_out`` start at zero in Flax too, so a ControlNet
initialised from a UNet's encoder leaves that UNet unchanged until it trains.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.models import layers
from jdistill.models.unet_cond import CLASS_EMBED_TYPES, ConditionalEncoder, Dtype

CHANNEL_ORDERS = ("rgb", "bgr")


def zero_conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    """A PyTorch-padded conv whose kernel and bias start at zero (diffusers' ``zero_module``)."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=param_dtype, name=name)


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers' ``ControlNetConditioningEmbedding``: ``conv_in``, then per stage a 3x3 conv
    (``blocks_{2i}``) and a stride-2 3x3 conv to the next width (``blocks_{2i+1}``), SiLU after
    each, and a zero-initialised ``conv_out`` to the UNet's first width. An image of
    2**(len(block_out_channels) - 1) times the latent size becomes a latent-size feature map."""

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = self.block_out_channels
        x = nn.silu(layers.conv(widths[0], 3, "conv_in", **kw)(cond))
        for i in range(len(widths) - 1):
            x = nn.silu(layers.conv(widths[i], 3, f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(layers.conv(widths[i + 1], 3, f"blocks_{2 * i + 1}", stride=2, **kw)(x))
        return zero_conv(self.out_channels, 3, "conv_out", **kw)(x)


class ControlNetModel(ConditionalEncoder):
    """diffusers' ``ControlNetModel``:
    ``apply({"params": p}, sample, timestep, encoder_hidden_states, controlnet_cond,
    conditioning_scale=1.0, added_cond_kwargs=None)`` with ``sample`` NHWC latents and
    ``controlnet_cond`` the NHWC conditioning image; keyword-only ``class_labels``,
    ``guess_mode`` (residuals scaled from 0.1 up to 1 along the stack, as diffusers does) and
    ``train``. Returns ``(down_block_res_samples, mid_block_res_sample)``, all scaled by
    ``conditioning_scale``.
    """

    layers_per_block: int = 2
    cross_attention_dim: int = 1280
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    family: ClassVar[str] = "ControlNetModel"
    class_embed_types: ClassVar[tuple] = tuple(t for t in CLASS_EMBED_TYPES if t != "simple_projection")
    mid_block_types: ClassVar[tuple] = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")

    def _validate(self):
        for name in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{self.family}: {name} must be a single int (diffusers' ControlNet takes one), "
                                 f"got {getattr(self, name)!r}")
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            self._refuse("controlnet_conditioning_channel_order", self.controlnet_conditioning_channel_order,
                         CHANNEL_ORDERS)
        super()._validate()

    @property
    def conditioning_factor(self) -> int:
        """How many times larger than the latents the conditioning image is."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def example_inputs(self, batch: int = 1) -> tuple[tuple, dict]:
        args, kwargs = super().example_inputs(batch)
        size = args[0].shape[1] * self.conditioning_factor
        cond = jnp.zeros((batch, size, size, self.conditioning_channels), jnp.float32)
        return (*args, cond), kwargs

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 added_cond_kwargs: Mapping | None = None, *, class_labels=None, guess_mode: bool = False,
                 train: bool = False):
        kw = self._kw()
        deterministic = not train
        self._check_context(encoder_hidden_states)
        batch = sample.shape[0]
        if self.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = jnp.flip(controlnet_cond, axis=-1)

        timesteps = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
        emb = layers.TimestepEmbedding(self.time_embed_dim, act=self.act_fn, name="time_embedding", **kw)(
            self._time_features(timesteps).astype(self.dtype))
        # diffusers' ControlNet builds its "timestep" class embedding with the default SiLU
        class_emb = self._class_embedding(class_labels, "silu")
        if class_emb is not None:
            emb = emb + class_emb
        aug = self._addition_embedding(added_cond_kwargs)
        if aug is not None:
            emb = emb + aug
        context = encoder_hidden_states.astype(self.dtype)

        x = layers.conv(self.block_out_channels[0], 3, "conv_in", **kw)(sample)
        cond = ControlNetConditioningEmbedding(self.block_out_channels[0], self.conditioning_embedding_out_channels,
                                               name="controlnet_cond_embedding", **kw)(controlnet_cond)
        if cond.shape != x.shape:
            raise ValueError(f"controlnet_cond embeds to {cond.shape[1:3]}, the latents are {x.shape[1:3]}: the "
                             f"image must be {self.conditioning_factor}x the latent size")
        x, skips = self._down_path(x + cond, emb, context, deterministic)
        x = self._mid_path(x, emb, context, deterministic)

        down = [zero_conv(s.shape[-1], 1, f"controlnet_down_blocks_{j}", **kw)(s) for j, s in enumerate(skips)]
        mid = zero_conv(x.shape[-1], 1, "controlnet_mid_block", **kw)(x)

        if guess_mode and not self.global_pool_conditions:
            # torch.logspace(-1, 0, n + 1): 0.1 for the first skip state up to 1 for the mid block
            scales = np.logspace(-1, 0, len(down) + 1, dtype=np.float32)
            down = [d * (float(s) * conditioning_scale) for d, s in zip(down, scales)]
            mid = mid * (float(scales[-1]) * conditioning_scale)
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def unet_residuals(controlnet: ControlNetModel, sample, timestep, encoder_hidden_states, image,
                   conditioning_scale: float = 1.0, added_cond_kwargs: Mapping | None = None, *, class_labels=None,
                   train: bool = False) -> dict:
    """A ControlNet's residuals as the keywords ``UNet2DConditionModel`` adds them by: the denoiser
    call of diffusers' ControlNet pipelines, without guess mode (both halves of a CFG batch carry
    the image). Global-pooling ControlNets run in guess mode, so they are refused. One call site
    for every composite that drives a UNet with a ControlNet (``ControlledUNet``, CoDi's
    ``ControlNetAdapter``)."""
    if controlnet.global_pool_conditions:
        raise InvalidArgument("a global-pooling ControlNet runs in guess mode (on the conditional half of a CFG batch "
                              "only), which jdistill's ControlNet composites do not reproduce")
    down, mid = controlnet(sample, timestep, encoder_hidden_states, image, conditioning_scale, added_cond_kwargs,
                           class_labels=class_labels, train=train)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
