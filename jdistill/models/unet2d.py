"""diffusers' pixel ``UNet2DModel`` in Flax (NHWC), from the shared blocks of ``unet_blocks``.

Fields are diffusers' config fields with diffusers' defaults, so a config.json
becomes a module with ``UNet2DModel(**config_from_diffusers(config))``.
Supported (anything else raises a ValueError naming it):

* blocks: ``DownBlock2D``, ``AttnDownBlock2D``, ``ResnetDownsampleBlock2D`` /
  ``UpBlock2D``, ``AttnUpBlock2D``, ``ResnetUpsampleBlock2D`` (the "UNetRes"
  prefix diffusers strips is accepted); mid block ``UNetMidBlock2D`` or None;
* time embedding "positional", "fourier" (Gaussian Fourier features of
  log sigma, output divided by sigma: score-SDE VE models) or "learned"
  (a table of ``num_train_timesteps`` rows: the consistency decoder);
* class embedding: a table (``num_class_embeds``), "timestep" or "identity";
* resnet time conditioning "default" or "scale_shift"; "conv" or "resnet"
  down / up sampling; dropout (active only when called with ``train=True``).

Refused: the Skip / AttnSkip blocks (FIR resampling of score-SDE NCSN++),
the K-diffusion and cross-attention blocks (they belong to other model
classes), "spatial" / "ada_group" resnet norms, ``norm_num_groups=None``
(which in diffusers only works with the Skip blocks).

``guidance_embed=True`` adds ``layers.GuidanceEmbedding`` of ``guidance`` (B,)
to the time embedding, for guidance-conditioned students (Meng et al.); its
zero-initialised last layer leaves a student built from a teacher's params
equal to the teacher.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdistill.models import layers
from jdistill.models.unet_blocks import (RESAMPLE_TYPES, TIME_EMBEDDING_NORMS, AttnDownBlock2D, AttnUpBlock2D,
                                         DownBlock2D, UNetMidBlock2D, UpBlock2D)

Dtype = Any

# block type -> (class, fields the type fixes); a field not fixed here comes from the config
DOWN_BLOCKS = {
    "DownBlock2D": (DownBlock2D, {"downsample_type": "conv"}),
    "AttnDownBlock2D": (AttnDownBlock2D, {}),
    "ResnetDownsampleBlock2D": (DownBlock2D, {"downsample_type": "resnet"}),
}
UP_BLOCKS = {
    "UpBlock2D": (UpBlock2D, {"upsample_type": "conv"}),
    "AttnUpBlock2D": (AttnUpBlock2D, {}),
    "ResnetUpsampleBlock2D": (UpBlock2D, {"upsample_type": "resnet"}),
}
MID_BLOCKS = ("UNetMidBlock2D", None)
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")


def _block_type(name: str) -> str:
    # diffusers' get_down_block / get_up_block accept a "UNetRes" prefix and drop it
    return name[len("UNetRes"):] if name.startswith("UNetRes") else name


class GaussianFourierProjection(nn.Module):
    """diffusers' ``GaussianFourierProjection`` as UNet2DModel uses it: [sin, cos] of
    2 pi log(sigma) W, with W (param ``weight``) ~ N(0, scale^2) fixed at init (PyTorch
    keeps it out of training with requires_grad=False: mask it in the optimizer)."""

    embedding_size: int
    scale: float = 16.0
    log: bool = True
    flip_sin_to_cos: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", lambda key, shape, dtype: self.scale * jax.random.normal(key, shape, dtype),
                       (self.embedding_size,), jnp.float32)
        x = jnp.asarray(x, jnp.float32)
        if self.log:
            x = jnp.log(x)
        # the same product order as PyTorch, x * w * 2 * pi: the phase reaches 1e3 and a
        # reassociated product would move sin() by more than the parity tolerance
        proj = x[:, None] * w[None, :] * 2 * math.pi
        first, second = (jnp.cos(proj), jnp.sin(proj)) if self.flip_sin_to_cos else (jnp.sin(proj), jnp.cos(proj))
        return jnp.concatenate([first, second], axis=-1)


class UNet2DModel(nn.Module):
    """diffusers' ``UNet2DModel``: ``apply({"params": p}, sample, timestep, class_labels, guidance)``
    with ``sample`` NHWC and ``timestep`` a scalar or (B,) (int or float; int for "learned");
    returns NHWC with ``out_channels`` channels. ``train=True`` turns dropout on (it then
    needs a "dropout" rng)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None
    guidance_embed: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self):
        def refuse(what, value, supported):
            raise ValueError(f"UNet2DModel: {what} {value!r} is not supported (supported: {list(supported)})")

        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(f"UNet2DModel: {len(self.down_block_types)} down_block_types, {len(self.up_block_types)} "
                             f"up_block_types and {n} block_out_channels must be as many")
        for name in self.down_block_types:
            if _block_type(name) not in DOWN_BLOCKS:
                refuse("down block type", name, DOWN_BLOCKS)
        for name in self.up_block_types:
            if _block_type(name) not in UP_BLOCKS:
                refuse("up block type", name, UP_BLOCKS)
        if self.mid_block_type not in MID_BLOCKS:
            refuse("mid_block_type", self.mid_block_type, MID_BLOCKS)
        if self.time_embedding_type not in TIME_EMBEDDING_TYPES:
            refuse("time_embedding_type", self.time_embedding_type, TIME_EMBEDDING_TYPES)
        if self.time_embedding_type == "learned" and not self.num_train_timesteps:
            raise ValueError("UNet2DModel: time_embedding_type 'learned' needs num_train_timesteps")
        if self.resnet_time_scale_shift not in TIME_EMBEDDING_NORMS:
            refuse("resnet_time_scale_shift", self.resnet_time_scale_shift, TIME_EMBEDDING_NORMS)
        if self.downsample_type not in RESAMPLE_TYPES:
            refuse("downsample_type", self.downsample_type, RESAMPLE_TYPES)
        if self.upsample_type not in RESAMPLE_TYPES:
            refuse("upsample_type", self.upsample_type, RESAMPLE_TYPES)
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            refuse("class_embed_type", self.class_embed_type, CLASS_EMBED_TYPES)
        if self.norm_num_groups is None:
            refuse("norm_num_groups", None, ["an int"])
        layers.activation(self.act_fn)  # raises on an unknown name

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def has_class_embedding(self) -> bool:
        # diffusers: a table when only num_class_embeds is set, else the named type
        return self.class_embed_type is not None or self.num_class_embeds is not None

    def dummy_inputs(self, batch_size: int = 1) -> dict:
        """Smallest valid inputs, for ``jax.eval_shape`` / ``init`` (the params do not depend on them)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        t_dtype = jnp.int32 if self.time_embedding_type == "learned" else jnp.float32
        # "fourier" takes log(t): a zero would be -inf; ones are valid for every type
        out = dict(sample=jnp.zeros((batch_size, size, size, self.in_channels), self.dtype),
                   timestep=jnp.ones((batch_size,), t_dtype))
        if self.class_embed_type == "identity":
            out["class_labels"] = jnp.zeros((batch_size, self.time_embed_dim), self.dtype)
        elif self.class_embed_type == "timestep":
            out["class_labels"] = jnp.ones((batch_size,), t_dtype)
        elif self.num_class_embeds is not None:
            out["class_labels"] = jnp.zeros((batch_size,), jnp.int32)
        if self.guidance_embed:
            out["guidance"] = jnp.zeros((batch_size,), jnp.float32)
        return out

    def _time_proj(self):
        """Timestep -> features: one module shared by the time and the "timestep" class
        embedding (diffusers applies its single ``time_proj`` to both)."""
        c0 = self.block_out_channels[0]
        if self.time_embedding_type == "positional":
            return lambda t: layers.timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
        if self.time_embedding_type == "fourier":
            return GaussianFourierProjection(c0, scale=16.0, name="time_proj")
        table = nn.Embed(self.num_train_timesteps, c0, dtype=jnp.float32, param_dtype=self.param_dtype,
                         name="time_proj")

        def learned(t):
            if not jnp.issubdtype(t.dtype, jnp.integer):
                raise ValueError("UNet2DModel with time_embedding_type 'learned' needs integer timesteps")
            return table(t)

        return learned

    @nn.compact
    def __call__(self, sample, timestep, class_labels=None, guidance=None, *, train: bool = False,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        """An adapter's controls, as diffusers' UNet2DConditionModel takes ControlNet residuals: one
        per skip state (applied after the down path) and one for the mid block's output; each an
        array (added) or a gated-fusion pair (``layers.fuse``)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = sample.shape[0]
        deterministic = not train
        if self.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
        time_proj = self._time_proj()
        emb = layers.TimestepEmbedding(self.time_embed_dim, name="time_embedding", **kw)(
            time_proj(timesteps).astype(self.dtype))

        if self.has_class_embedding:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if self.class_embed_type == "timestep":
                class_emb = layers.TimestepEmbedding(self.time_embed_dim, name="class_embedding", **kw)(
                    time_proj(jnp.asarray(class_labels)).astype(self.dtype))
            elif self.class_embed_type == "identity":
                class_emb = jnp.asarray(class_labels, self.dtype)
            else:
                class_emb = nn.Embed(self.num_class_embeds, self.time_embed_dim, name="class_embedding", **kw)(
                    jnp.asarray(class_labels))
            emb = emb + class_emb
        elif class_labels is not None:
            raise ValueError("class_labels given to a UNet2DModel without a class embedding")

        if self.guidance_embed:
            if guidance is None:
                raise ValueError("a UNet2DModel with guidance_embed=True needs `guidance` (B,)")
            emb = emb + layers.GuidanceEmbedding(self.time_embed_dim, name="guidance_embedder", **kw)(
                jnp.broadcast_to(jnp.asarray(guidance), (batch,)))
        elif guidance is not None:
            raise ValueError("guidance given to a UNet2DModel without guidance_embed")

        blocks = dict(num_layers=self.layers_per_block, resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups,
                      resnet_act_fn=self.act_fn, resnet_time_scale_shift=self.resnet_time_scale_shift,
                      dropout=self.dropout, **kw)
        n = len(self.block_out_channels)

        x = layers.conv(self.block_out_channels[0], 3, "conv_in", **kw)(sample)
        skips = [x]
        for i, name in enumerate(self.down_block_types):
            cls, fixed = DOWN_BLOCKS[_block_type(name)]
            extra = {"attention_head_dim": self.attention_head_dim} if cls is AttnDownBlock2D else {}
            block = cls(**{**blocks, "out_channels": self.block_out_channels[i], "add_downsample": i < n - 1,
                           "downsample_type": self.downsample_type, "downsample_padding": self.downsample_padding,
                           **extra, **fixed}, name=f"down_blocks_{i}")
            x, states = block(x, emb, deterministic=deterministic)
            self.sow("intermediates", f"down_{i}", x)
            skips += states
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} down_block_additional_residuals for "
                                 f"{len(skips)} skip states")
            skips = [layers.fuse(s, c) for s, c in zip(skips, down_block_additional_residuals)]

        if self.mid_block_type is not None:
            x = UNetMidBlock2D(**{**blocks, "num_layers": 1}, output_scale_factor=self.mid_block_scale_factor,
                               add_attention=self.add_attention, attention_head_dim=self.attention_head_dim,
                               attn_groups=self.attn_norm_num_groups, name="mid_block")(
                x, emb, deterministic=deterministic)
            x = layers.fuse(x, mid_block_additional_residual)
            self.sow("intermediates", "mid", x)
        elif mid_block_additional_residual is not None:
            raise ValueError("mid_block_additional_residual given to a UNet2DModel without a mid block")

        for i, name in enumerate(self.up_block_types):
            cls, fixed = UP_BLOCKS[_block_type(name)]
            extra = {"attention_head_dim": self.attention_head_dim} if cls is AttnUpBlock2D else {}
            block = cls(**{**blocks, "num_layers": self.layers_per_block + 1,
                           "out_channels": self.block_out_channels[n - 1 - i], "add_upsample": i < n - 1,
                           "upsample_type": self.upsample_type, **extra, **fixed}, name=f"up_blocks_{i}")
            states, skips = skips[-block.num_layers:], skips[:-block.num_layers]
            x = block(x, states, emb, deterministic=deterministic)
            self.sow("intermediates", f"up_{i}", x)

        # diffusers' conv_act is SiLU whatever act_fn says
        x = nn.silu(layers.group_norm(self.norm_num_groups, "conv_norm_out", self.norm_eps, **kw)(x))
        x = layers.conv(self.out_channels, 3, "conv_out", **kw)(x)
        if self.time_embedding_type == "fourier":
            # score-SDE VE parameterisation: the network's raw output is sigma * score
            x = x / timesteps.reshape(batch, 1, 1, 1).astype(x.dtype)
        return x


def config_from_diffusers(config: Mapping) -> dict:
    """Keyword arguments for :class:`UNet2DModel` from a diffusers ``config.json`` dict.

    Keys starting with "_" (``_class_name``, ``_diffusers_version``) are bookkeeping and
    skipped; lists become tuples; any other key the Flax model does not know raises a
    ValueError naming it (a silently ignored option would change the network).
    """
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"config is for {config['_class_name']}, not UNet2DModel")
    known = {f.name for f in dataclasses.fields(UNet2DModel)} - {"parent", "name", "dtype", "param_dtype",
                                                                   "guidance_embed"}
    out, unknown = {}, []
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in known:
            unknown.append(key)
            continue
        out[key] = tuple(value) if isinstance(value, list) else value
    if unknown:
        raise ValueError(f"UNet2DModel config keys not supported by jdistill: {sorted(unknown)}")
    UNet2DModel(**out)  # validates the values now, with the same messages as construction
    return out
