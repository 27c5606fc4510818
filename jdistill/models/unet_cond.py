"""diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x, 2.x, SDXL) in Flax (NHWC), from
the shared blocks of ``unet_blocks``.

Fields are diffusers' config fields with diffusers' defaults; a config.json becomes a module
with ``jdistill.convert.unet_cond.module_from_config``. Supported (anything else raises a
ValueError naming it):

* blocks ``CrossAttnDownBlock2D`` / ``DownBlock2D``, ``CrossAttnUpBlock2D`` / ``UpBlock2D``,
  mid block ``UNetMidBlock2DCrossAttn``, ``UNetMidBlock2D`` (resnet only) or None;
* the transformer options of SD 1.x (1x1-conv ``proj_in``), SD 2.x (``use_linear_projection``,
  one head count per block) and SDXL (``transformer_layers_per_block`` per block, or per
  resnet with ``reverse_transformer_layers_per_block``), ``only_cross_attention``,
  ``upcast_attention`` (a no-op: JAX's attention already forms its softmax in float32);
  ``layers_per_block`` / ``attention_head_dim`` / ``cross_attention_dim`` per block;
* the SDXL "text_time" addition embedding (``added_cond_kwargs`` {"text_embeds",
  "time_ids"}); class embeddings (a ``num_class_embeds`` table, "timestep", "identity",
  "projection", "simple_projection", optionally concatenated); ``time_cond_proj_dim``
  (``timestep_cond``, as LCM students use), ``timestep_post_act``, ``time_embedding_act_fn``,
  ``time_embedding_dim``, ``conv_in_kernel`` / ``conv_out_kernel``, ``center_input_sample``;
  resnet time conditioning "default" / "scale_shift"; dropout (``train=True`` only).

Refused: the other block types (spatial-attention ``Attn*Block2D``, ``SimpleCrossAttn*``,
``ResnetDownsample`` / ``ResnetUpsample``, K-diffusion blocks), ``dual_cross_attention``,
``encoder_hid_dim`` (Kandinsky / IF projections), the other addition embeddings, Fourier time
features, GLIGEN attention, T2I-Adapter residuals, ``num_attention_heads`` (diffusers refuses
it too), ``norm_num_groups=None``.

ControlNet's residuals enter as diffusers' ``down_block_additional_residuals`` (one per skip
state, added after the down path) and ``mid_block_additional_residual`` (added after the mid
block): :class:`jdistill.models.controlnet.ControlNetModel` returns exactly that pair. Its
encoder half (embeddings, down blocks, mid block) is :class:`ConditionalEncoder`, shared with
this UNet.

``guidance_embed=True`` adds ``layers.GuidanceEmbedding`` of ``guidance`` (B,) to the time
embedding, for guidance-distilled students; its zero-initialised last layer leaves a student
built from a teacher's params equal to the teacher.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jdistill.models import layers
from jdistill.models.unet2d import _block_type
from jdistill.models.unet_blocks import (TIME_EMBEDDING_NORMS, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                         UNetMidBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D)

Dtype = Any

DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
ADDITION_EMBED_TYPES = (None, "text_time")


def per_block(value, n: int, what: str) -> tuple:
    """``value`` for each of ``n`` blocks: a scalar repeated, or a sequence of exactly n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding`` with the optional parts the conditional UNet uses
    (``layers.TimestepEmbedding`` is the plain form, with the same param names):
    ``cond_proj`` (no bias) of a ``condition`` added to the input features (``timestep_cond``,
    LCM's guidance embedding), linear_1 -> act -> linear_2, then ``post_act``."""

    dim: int
    act: str = "silu"
    post_act: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, condition=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if condition is not None:
            x = x + layers.dense(x.shape[-1], "cond_proj", use_bias=False, **kw)(condition)
        x = layers.dense(self.dim, "linear_1", **kw)(x)
        x = layers.dense(self.dim, "linear_2", **kw)(layers.activation(self.act)(x))
        return x if self.post_act is None else layers.activation(self.post_act)(x)


class ConditionalEncoder(nn.Module):
    """The encoder half of a conditional UNet: its fields (diffusers' names and defaults) and
    the helpers :class:`UNet2DConditionModel` and ``ControlNetModel`` build it with, called from
    their ``__call__`` so that every param keeps diffusers' top-level name (``time_embedding``,
    ``class_embedding``, ``add_embedding``, ``down_blocks_N``, ``mid_block``).

    ``attention_head_dim`` is, as in diffusers, the number of heads (a historical misnomer);
    ``num_attention_heads``, where a subclass allows it, overrides it.
    """

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    # rematerialisation of every resnet and transformer block ("none", "full", "dots":
    # layers.REMAT_POLICIES); not a diffusers option, the function and params are unchanged
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    family: ClassVar[str] = "conditional UNet"
    class_embed_types: ClassVar[tuple] = CLASS_EMBED_TYPES
    mid_block_types: ClassVar[tuple] = MID_BLOCKS

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    # --- configuration -------------------------------------------------------------------

    def _refuse(self, what, value, supported):
        raise ValueError(f"{self.family}: {what} {value!r} is not supported (supported: {list(supported)})")

    def _validate(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ValueError(f"{self.family}: {len(self.down_block_types)} down_block_types and {n} "
                             "block_out_channels must be as many")
        for name in self.down_block_types:
            if _block_type(name) not in DOWN_BLOCKS:
                self._refuse("down block type", name, DOWN_BLOCKS)
        if self.mid_block_type not in self.mid_block_types:
            self._refuse("mid_block_type", self.mid_block_type, self.mid_block_types)
        if self.class_embed_type not in self.class_embed_types:
            self._refuse("class_embed_type", self.class_embed_type, self.class_embed_types)
        projected = self.class_embed_type in ("projection", "simple_projection")
        if projected and not self.projection_class_embeddings_input_dim:
            raise ValueError(f"{self.family}: class_embed_type {self.class_embed_type!r} needs "
                             "projection_class_embeddings_input_dim")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            self._refuse("addition_embed_type", self.addition_embed_type, ADDITION_EMBED_TYPES)
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim
                                                            and self.projection_class_embeddings_input_dim):
            raise ValueError(f"{self.family}: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.resnet_time_scale_shift not in TIME_EMBEDDING_NORMS:
            self._refuse("resnet_time_scale_shift", self.resnet_time_scale_shift, TIME_EMBEDDING_NORMS)
        if self.norm_num_groups is None:
            self._refuse("norm_num_groups", None, ["an int"])
        layers.activation(self.act_fn)  # raises on an unknown name
        per_block(self.only_cross_attention, n, "only_cross_attention")
        per_block(self.layers_per_block, n, "layers_per_block")
        if len(set(per_block(self.cross_attention_dim, n, "cross_attention_dim"))) != 1:
            # every block attends to the same encoder_hidden_states: one width is all that can work
            raise ValueError(f"{self.family}: cross_attention_dim {self.cross_attention_dim!r} differs between "
                             "blocks, but all blocks read the same encoder_hidden_states")
        cross = [i for i, name in enumerate(self.down_block_types) if DOWN_BLOCKS[_block_type(name)] is not DownBlock2D]
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            cross.append(n - 1)
        for i in cross:
            self._check_heads(self.heads[i], self.block_out_channels[i], f"block {i}")
        for i, (depth, count) in enumerate(zip(self.down_transformer_layers, self.layers)):
            if not isinstance(depth, int) and len(depth) != count:
                raise ValueError(f"{self.family}: transformer_layers_per_block entry {depth!r} of block {i} needs "
                                 f"one count per resnet ({count})")

    def _check_heads(self, heads, channels, where):
        if not isinstance(heads, int) or heads < 1 or channels // heads < 1:
            raise ValueError(f"{self.family}: {heads!r} attention heads do not fit {where} of {channels} channels")

    @property
    def layers(self) -> tuple[int, ...]:
        return per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

    @property
    def heads(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return per_block(heads, len(self.block_out_channels), "attention_head_dim")

    @property
    def down_transformer_layers(self) -> tuple:
        return per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                         "transformer_layers_per_block")

    @property
    def context_dim(self) -> int:
        """The width of ``encoder_hidden_states``."""
        dims = self.cross_attention_dim
        return dims if isinstance(dims, int) else dims[0]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def has_class_embedding(self) -> bool:
        # diffusers: a table when only num_class_embeds is set, else the named type
        return self.class_embed_type is not None or self.num_class_embeds is not None

    def example_inputs(self, batch: int = 1) -> tuple[tuple, dict]:
        """Smallest valid ``(args, kwargs)`` for ``init`` / ``jax.eval_shape`` (params do not
        depend on the spatial size or the token count)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        args = (jnp.zeros((batch, size, size, self.in_channels), jnp.float32), jnp.ones((batch,), jnp.float32),
                jnp.zeros((batch, 1, self.context_dim), jnp.float32))
        kwargs = {}
        if self.addition_embed_type == "text_time":
            # only the concatenated width [text_embeds, features of time_ids] shapes add_embedding
            text = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": jnp.zeros((batch, text), jnp.float32),
                                           "time_ids": jnp.zeros((batch, 1), jnp.float32)}
        if self.class_embed_type in ("projection", "simple_projection"):
            kwargs["class_labels"] = jnp.zeros((batch, self.projection_class_embeddings_input_dim), jnp.float32)
        elif self.class_embed_type == "identity":
            kwargs["class_labels"] = jnp.zeros((batch, self.time_embed_dim), jnp.float32)
        elif self.class_embed_type == "timestep":
            kwargs["class_labels"] = jnp.ones((batch,), jnp.float32)
        elif self.num_class_embeds is not None:
            kwargs["class_labels"] = jnp.zeros((batch,), jnp.int32)
        return args, kwargs

    # --- pieces for __call__ (they define submodules: call them from a compact method) -------

    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _time_features(self, t):
        return layers.timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)

    def _check_context(self, encoder_hidden_states):
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
            raise ValueError(f"{self.family}: encoder_hidden_states must be (B, S, {self.context_dim})")
        if encoder_hidden_states.shape[-1] != self.context_dim:
            raise ValueError(f"{self.family}: encoder_hidden_states have {encoder_hidden_states.shape[-1]} channels, "
                             f"cross_attention_dim is {self.context_dim}")

    def _class_embedding(self, class_labels, class_act: str):
        """The class embedding (B, time_embed_dim) or None. ``class_act`` is the activation of
        the "timestep" type (diffusers' UNet uses ``act_fn``, its ControlNet SiLU)."""
        if not self.has_class_embedding:
            if class_labels is not None:
                raise ValueError(f"class_labels given to a {self.family} without a class embedding")
            return None
        if class_labels is None:
            raise ValueError(f"a {self.family} with a class embedding needs class_labels")
        kw, dim = self._kw(), self.time_embed_dim
        labels = jnp.asarray(class_labels)
        kind = self.class_embed_type
        if kind is None:
            emb = nn.Embed(self.num_class_embeds, dim, name="class_embedding", **kw)(labels)
        elif kind == "timestep":
            emb = TimestepEmbedding(dim, class_act, name="class_embedding", **kw)(
                self._time_features(labels).astype(self.dtype))
        elif kind == "identity":
            emb = labels
        elif kind == "projection":
            emb = TimestepEmbedding(dim, name="class_embedding", **kw)(labels.astype(self.dtype))
        else:  # "simple_projection"
            emb = layers.dense(dim, "class_embedding", **kw)(labels.astype(self.dtype))
        return emb.astype(self.dtype)

    def _addition_embedding(self, added_cond_kwargs):
        """SDXL's "text_time" embedding of the pooled text embedding and the size / crop
        conditioning ``time_ids``, or None."""
        if self.addition_embed_type is None:
            return None
        missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
        if missing:
            raise ValueError(f"a {self.family} with addition_embed_type 'text_time' needs added_cond_kwargs "
                             f"{missing}")
        text = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        time_embeds = layers.timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                                self.flip_sin_to_cos, self.freq_shift)
        time_embeds = time_embeds.reshape(text.shape[0], -1)
        features = jnp.concatenate([text.astype(jnp.float32), time_embeds], axis=-1)
        if features.shape[-1] != self.projection_class_embeddings_input_dim:
            raise ValueError(f"text_embeds ({text.shape[-1]}) and the features of time_ids ({time_embeds.shape[-1]}) "
                             f"make {features.shape[-1]} inputs, projection_class_embeddings_input_dim is "
                             f"{self.projection_class_embeddings_input_dim}")
        return TimestepEmbedding(self.time_embed_dim, name="add_embedding", **self._kw())(features.astype(self.dtype))

    def _resnet_fields(self) -> dict:
        return dict(resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups, resnet_act_fn=self.act_fn,
                    resnet_time_scale_shift=self.resnet_time_scale_shift, dropout=self.dropout, remat=self.remat,
                    **self._kw())

    def _cross_fields(self, heads, depth, only_cross) -> dict:
        return dict(num_attention_heads=heads, transformer_layers_per_block=depth,
                    use_linear_projection=self.use_linear_projection, only_cross_attention=only_cross,
                    upcast_attention=self.upcast_attention)

    def _down_path(self, x, emb, context, deterministic):
        """conv_in's output -> (lowest feature map, skip states): the input and every down
        block's states, in the order the up path (and ControlNet's zero convs) consume them."""
        n = len(self.block_out_channels)
        only_cross = per_block(self.only_cross_attention, n, "only_cross_attention")
        skips = [x]
        for i, name in enumerate(self.down_block_types):
            cls = DOWN_BLOCKS[_block_type(name)]
            fields = dict(self._resnet_fields(), out_channels=self.block_out_channels[i], num_layers=self.layers[i],
                          add_downsample=i < n - 1, downsample_padding=self.downsample_padding)
            if cls is CrossAttnDownBlock2D:
                fields.update(self._cross_fields(self.heads[i], self.down_transformer_layers[i], only_cross[i]))
            x, states = cls(**fields, name=f"down_blocks_{i}")(
                x, emb, deterministic=deterministic, attention_kwargs={"encoder_hidden_states": context})
            self.sow("intermediates", f"down_{i}", x)
            skips += states
        return x, skips

    def _mid_path(self, x, emb, context, deterministic):
        fields = dict(self._resnet_fields(), output_scale_factor=self.mid_block_scale_factor)
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            block = UNetMidBlock2DCrossAttn(**fields, num_layers=1, name="mid_block",
                                            **self._cross_fields(self.heads[-1], self.down_transformer_layers[-1],
                                                                 False))
        elif self.mid_block_type == "UNetMidBlock2D":
            # diffusers' conditional UNets build this one without attention: resnets_0 only
            block = UNetMidBlock2D(**fields, num_layers=0, add_attention=False, name="mid_block")
        else:
            return x
        return block(x, emb, deterministic=deterministic, attention_kwargs={"encoder_hidden_states": context})


class UNet2DConditionModel(ConditionalEncoder):
    """diffusers' ``UNet2DConditionModel``:
    ``apply({"params": p}, sample, timestep, encoder_hidden_states, added_cond_kwargs,
    down_block_additional_residuals, mid_block_additional_residual, guidance)`` with ``sample``
    NHWC, ``timestep`` a scalar or (B,), ``encoder_hidden_states`` (B, S, cross_attention_dim);
    returns NHWC with ``out_channels`` channels. Keyword-only: ``class_labels``,
    ``timestep_cond`` (B, time_cond_proj_dim) and ``train`` (dropout on; needs a "dropout" rng).

    Latent sizes that do not halve evenly are handled as diffusers does: each upsampler
    resizes to its skip state's size.
    """

    sample_size: int | tuple[int, int] | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    reverse_transformer_layers_per_block: tuple | None = None
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    class_embeddings_concat: bool = False
    guidance_embed: bool = False

    family: ClassVar[str] = "UNet2DConditionModel"

    def _validate(self):
        super()._validate()
        n = len(self.block_out_channels)
        if len(self.up_block_types) != n:
            raise ValueError(f"{self.family}: {len(self.up_block_types)} up_block_types and {n} block_out_channels "
                             "must be as many")
        for i, name in enumerate(self.up_block_types):
            if _block_type(name) not in UP_BLOCKS:
                self._refuse("up block type", name, UP_BLOCKS)
            if UP_BLOCKS[_block_type(name)] is CrossAttnUpBlock2D:
                self._check_heads(self.heads[::-1][i], self.block_out_channels[::-1][i], f"up block {i}")
        if self.num_attention_heads is not None:
            # diffusers' UNet2DConditionModel refuses it as well (its attention_head_dim is the head count)
            raise ValueError(f"{self.family}: num_attention_heads is not supported; diffusers reads the head count "
                             "from attention_head_dim")
        for name, fn in (("time_embedding_act_fn", self.time_embedding_act_fn),
                         ("timestep_post_act", self.timestep_post_act)):
            if fn is not None:
                layers.activation(fn)
        nested = any(not isinstance(d, int) for d in self.down_transformer_layers)
        if nested and self.reverse_transformer_layers_per_block is None:
            raise ValueError(f"{self.family}: per-resnet transformer_layers_per_block needs "
                             "reverse_transformer_layers_per_block (as diffusers requires)")
        if self.reverse_transformer_layers_per_block is not None:
            for i, (depth, count) in enumerate(zip(per_block(self.reverse_transformer_layers_per_block, n,
                                                             "reverse_transformer_layers_per_block"),
                                                   self.layers[::-1])):
                if not isinstance(depth, int) and len(depth) != count + 1:
                    raise ValueError(f"{self.family}: reverse_transformer_layers_per_block entry {depth!r} of up "
                                     f"block {i} needs one count per resnet ({count + 1})")
        for kernel in (self.conv_in_kernel, self.conv_out_kernel):
            if kernel % 2 == 0:
                raise ValueError(f"{self.family}: even conv kernel {kernel} is not supported (PyTorch pads it "
                                 "asymmetrically)")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def up_transformer_layers(self) -> tuple:
        if self.reverse_transformer_layers_per_block is not None:
            return per_block(self.reverse_transformer_layers_per_block, len(self.block_out_channels),
                             "reverse_transformer_layers_per_block")
        return self.down_transformer_layers[::-1]

    def example_inputs(self, batch: int = 1) -> tuple[tuple, dict]:
        args, kwargs = super().example_inputs(batch)
        if self.time_cond_proj_dim is not None:
            kwargs["timestep_cond"] = jnp.zeros((batch, self.time_cond_proj_dim), jnp.float32)
        if self.guidance_embed:
            kwargs["guidance"] = jnp.zeros((batch,), jnp.float32)
        return args, kwargs

    def _embedding(self, batch, timestep, encoder_hidden_states, added_cond_kwargs, class_labels, timestep_cond,
                   guidance):
        kw = self._kw()
        timesteps = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
        if timestep_cond is not None and self.time_cond_proj_dim is None:
            raise ValueError("timestep_cond given to a UNet2DConditionModel without time_cond_proj_dim")
        emb = TimestepEmbedding(self.time_embed_dim, self.act_fn, self.timestep_post_act, name="time_embedding",
                                **kw)(self._time_features(timesteps).astype(self.dtype),
                                      None if timestep_cond is None else jnp.asarray(timestep_cond, self.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("a UNet2DConditionModel with guidance_embed=True needs `guidance` (B,)")
            emb = emb + layers.GuidanceEmbedding(self.time_embed_dim, name="guidance_embedder", **kw)(
                jnp.broadcast_to(jnp.asarray(guidance), (batch,)))
        elif guidance is not None:
            raise ValueError("guidance given to a UNet2DConditionModel without guidance_embed")

        class_emb = self._class_embedding(class_labels, self.act_fn)
        if class_emb is not None:
            emb = jnp.concatenate([emb, class_emb], -1) if self.class_embeddings_concat else emb + class_emb
        aug = self._addition_embedding(added_cond_kwargs)
        if aug is not None:
            emb = emb + aug
        if self.time_embedding_act_fn is not None:
            emb = layers.activation(self.time_embedding_act_fn)(emb)
        return emb

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs: Mapping | None = None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, guidance=None, *,
                 class_labels=None, timestep_cond=None, train: bool = False):
        kw = self._kw()
        deterministic = not train
        self._check_context(encoder_hidden_states)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            # diffusers reads down residuals alone as T2I-Adapter intrablock residuals, another mechanism
            raise ValueError("ControlNet residuals come as a pair: down_block_additional_residuals and "
                             "mid_block_additional_residual (T2I-Adapter residuals are not supported)")
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embedding(sample.shape[0], timestep, encoder_hidden_states, added_cond_kwargs, class_labels,
                              timestep_cond, guidance)
        context = encoder_hidden_states.astype(self.dtype)

        x = layers.conv(self.block_out_channels[0], self.conv_in_kernel, "conv_in",
                        padding=(self.conv_in_kernel - 1) // 2, **kw)(sample)
        x, skips = self._down_path(x, emb, context, deterministic)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} down_block_additional_residuals for "
                                 f"{len(skips)} skip states")
            skips = [s + jnp.asarray(r).astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        x = self._mid_path(x, emb, context, deterministic)
        if mid_block_additional_residual is not None:
            x = x + jnp.asarray(mid_block_additional_residual).astype(x.dtype)
        self.sow("intermediates", "mid", x)

        n = len(self.block_out_channels)
        heads, layers_up = self.heads[::-1], self.layers[::-1]
        only_cross = per_block(self.only_cross_attention, n, "only_cross_attention")[::-1]
        for i, name in enumerate(self.up_block_types):
            cls = UP_BLOCKS[_block_type(name)]
            fields = dict(self._resnet_fields(), out_channels=self.block_out_channels[n - 1 - i],
                          num_layers=layers_up[i] + 1, add_upsample=i < n - 1)
            if cls is CrossAttnUpBlock2D:
                fields.update(self._cross_fields(heads[i], self.up_transformer_layers[i], only_cross[i]))
            states, skips = skips[-fields["num_layers"]:], skips[:-fields["num_layers"]]
            # upsample to the next skip's size: x2 for even sizes, diffusers' forced size for odd ones
            output_size = tuple(skips[-1].shape[1:3]) if skips else None
            x = cls(**fields, name=f"up_blocks_{i}")(
                x, states, emb, output_size=output_size, deterministic=deterministic,
                attention_kwargs={"encoder_hidden_states": context})
            self.sow("intermediates", f"up_{i}", x)

        x = layers.group_norm(self.norm_num_groups, "conv_norm_out", self.norm_eps, **kw)(x)
        x = layers.activation(self.act_fn)(x)
        return layers.conv(self.out_channels, self.conv_out_kernel, "conv_out",
                           padding=(self.conv_out_kernel - 1) // 2, **kw)(x)
