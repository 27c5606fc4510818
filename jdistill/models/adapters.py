"""Composite networks: a backbone (a pretrained denoiser) with an adapter that reads a condition image.

    net = Adapted(backbone=teacher.module, adapter=GatedDiTAdapter(...), condition_channels=1)
    out = net.apply({"params": {"backbone": teacher_params, "adapter": a}}, z, t, condition=c, class_labels=y)

One Flax module, so one :class:`~jdistill.denoiser.Denoiser` (its condition dict carries
``condition`` beside the backbone's own inputs) and one param tree ``{"backbone", "adapter"}``,
whose ``adapter`` subtree is what a parameter-efficient method trains (``adapter_mask``).

The adapter returns the backbone's control keywords, each control a residual or a gated-fusion
pair (``layers.fuse``):

* :class:`GatedDiTAdapter` / :class:`GatedUNetAdapter`: CoDi's gated fusion (Mei et al., CVPR
  2024), h' = (1 - mu) h + mu a(c) on every DiT block's tokens / every UNet skip state and the
  mid block, a(c) from a small condition encoder, each mu a scalar initialised to 0;
* :class:`ControlDiTAdapter`: ControlNet-style (as PixArt's ControlNet): a trainable copy of the
  DiT's patch embedding, embedder and first blocks, reading the condition through a
  zero-initialised projection, with zero-initialised linear residuals into the backbone's blocks;
* :class:`ControlNetAdapter`: the project's ControlNet (models/controlnet.py) for SD UNets, its
  zero convs into the UNet's skip and mid features.

At initialisation every adapter changes nothing: the composite's output equals the backbone's
(mu = 0, zero residuals). :func:`init_adapted` starts a composite from the backbone's params:
fresh adapter params, ControlNet copies taken from the backbone's own weights.

The condition encoder's input is the condition image at the model's resolution (a low-resolution
image upsampled, a masked image with its mask, an edge map: ``jdistill.data.conditions``).

(Written for consistency distillation / CoDi; a general UNet + ControlNet composite is being
written elsewhere: the lead reconciles the two.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jdistill.models import layers
from jdistill.models.controlnet import unet_residuals

Dtype = Any
ADAPTER_KINDS = ("gated", "controlnet")
_zeros = nn.initializers.zeros


class ConditionStem(nn.Module):
    """Condition image -> features at full resolution: two 3x3 convs with SiLU."""

    width: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        c = jnp.asarray(c, self.dtype)
        c = nn.silu(layers.conv(self.width, 3, "conv_0", dtype=self.dtype)(c))
        return nn.silu(layers.conv(self.width, 3, "conv_1", dtype=self.dtype)(c))


def _condition_tokens(module, condition, dim: int, patch: int, input_size: int, width: int):
    """Condition image -> (B, T, dim) tokens on the DiT's patch grid (with its position table)."""
    from jdistill.models.dit import PatchEmbed

    f = ConditionStem(width, module.dtype, name="stem")(condition)
    return PatchEmbed(dim, patch, input_size, name="patch", dtype=module.dtype)(f)


class GatedDiTAdapter(nn.Module):
    """a_i(c) per DiT block and its gate mu_i (0 at init): h_i' = (1 - mu_i) h_i + mu_i a_i(c)."""

    depth: int
    hidden_size: int
    patch_size: int
    input_size: int
    width: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, condition, backbone_kwargs):
        tokens = nn.silu(_condition_tokens(self, condition, self.hidden_size, self.patch_size, self.input_size,
                                           self.width))
        controls = []
        for i in range(self.depth):
            a = nn.Dense(self.hidden_size, dtype=self.dtype, name=f"features_{i}")(tokens)
            mu = self.param(f"gate_{i}", _zeros, (), jnp.float32)
            controls.append((a, mu))
        return {"block_controls": tuple(controls)}


class ControlDiTAdapter(nn.Module):
    """ControlNet for a DiT: ``copy`` (the backbone's fields, ``copy_depth`` blocks) runs on z_t with the
    condition tokens added through ``condition_in`` (zero at init); ``zero_{i}`` (zero at init) turns
    copy block i's tokens into a residual of backbone block i. ``copy`` starts as the backbone's weights."""

    backbone: nn.Module
    copy_depth: int
    width: int = 32

    @nn.compact
    def __call__(self, x, t, condition, backbone_kwargs):
        bb = self.backbone
        d = bb.hidden_size
        tokens = _condition_tokens(self, condition, d, bb.patch_size, bb.input_size, self.width)
        residual = nn.Dense(d, kernel_init=_zeros, dtype=bb.dtype, name="condition_in")(nn.silu(tokens))
        copy = bb.clone(depth=self.copy_depth, name="copy", parent=self)
        blocks = copy(x, t, **backbone_kwargs, input_residual=residual, return_blocks=True)
        controls = [nn.Dense(d, kernel_init=_zeros, dtype=bb.dtype, name=f"zero_{i}")(b) for i, b in enumerate(blocks)]
        return {"block_controls": tuple(controls) + (None,) * (bb.depth - self.copy_depth)}

    @property
    def dtype(self):
        return self.backbone.dtype


def unet2d_skip_layout(unet, height: int, width: int) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """(h, w, channels) of a UNet2DModel's skip states in order (conv_in's, then each down block's
    resnets and downsampler), and of its mid block's output."""
    chans = unet.block_out_channels
    h, w = height, width
    skips = [(h, w, chans[0])]
    for i, c in enumerate(chans):
        skips += [(h, w, c)] * unet.layers_per_block
        if i < len(chans) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            skips.append((h, w, c))
    return skips, (h, w, chans[-1])


class GatedUNetAdapter(nn.Module):
    """Gated fusion into a UNet2DModel's skip states and mid block: a condition pyramid (one stride-2
    conv per level), a 1x1 conv per state to its width, a gate mu per state (0 at init)."""

    backbone: nn.Module
    width: int = 32

    @nn.compact
    def __call__(self, x, t, condition, backbone_kwargs):
        dtype = self.backbone.dtype
        skips, mid = unet2d_skip_layout(self.backbone, x.shape[1], x.shape[2])
        h = x.shape[1]
        level = {h: ConditionStem(self.width, dtype, name="stem")(condition)}
        while h > min(s[0] for s in skips + [mid]):  # a pyramid down to the smallest state
            level[(h + 1) // 2] = nn.silu(layers.conv(self.width, 3, f"down_{len(level) - 1}", stride=2,
                                                      dtype=dtype)(level[h]))
            h = (h + 1) // 2

        def control(name, shape):
            a = layers.conv(shape[2], 1, f"features_{name}", dtype=dtype)(level[shape[0]])
            return a, self.param(f"gate_{name}", _zeros, (), jnp.float32)

        return {"down_block_additional_residuals": tuple(control(j, s) for j, s in enumerate(skips)),
                "mid_block_additional_residual": control("mid", mid)}


class ControlNetAdapter(nn.Module):
    """The project's ControlNetModel on an SD UNet: its residuals into the UNet's skip and mid features."""

    controlnet: nn.Module

    @nn.compact
    def __call__(self, x, t, condition, backbone_kwargs):
        # self.controlnet, a dataclass field, is bound by Flax as the submodule "controlnet"
        return unet_residuals(self.controlnet, x, t, backbone_kwargs["encoder_hidden_states"], condition,
                              added_cond_kwargs=backbone_kwargs.get("added_cond_kwargs"),
                              class_labels=backbone_kwargs.get("class_labels"))


class Adapted(nn.Module):
    """``backbone(x, t, **kwargs, **adapter(x, t, condition, kwargs))``; params ``{"backbone", "adapter"}``.

    Reads like its backbone to the rest of jdistill (image size, channels, classes, guidance input),
    plus the ``condition`` keyword: the condition image (B, H', W', ``condition_channels``)."""

    backbone: nn.Module
    adapter: nn.Module
    condition_channels: int
    condition_size: int | None = None  # the condition image's side (default: the backbone's)

    def __call__(self, x, t, *args, condition=None, **kwargs):
        if condition is None:
            raise ValueError("an adapted network needs its `condition` image")
        kwargs = dict(zip(_positional_names(self.backbone), args), **kwargs)
        controls = self.adapter(x, t, condition, kwargs)
        return self.backbone(x, t, **kwargs, **controls)

    # -- what registry / Denoiser read off a module -------------------------------------
    def __getattr__(self, name):
        if name in _DELEGATED:
            return getattr(self.backbone, name)
        return super().__getattr__(name)

    def example_inputs(self, batch: int = 1) -> tuple[tuple, dict]:
        from jdistill.models import registry

        args, kwargs = registry.example_inputs(self.backbone, batch)
        if not args:  # DiT names its inputs (x, t), UNet2DModel (sample, timestep): positional here
            kwargs = dict(kwargs)
            image = kwargs.pop("x") if "x" in kwargs else kwargs.pop("sample")
            time = kwargs.pop("t") if "t" in kwargs else kwargs.pop("timestep")
            args = (image, time)
        x = args[0]
        # the condition keeps its ratio to the latents (a ControlNet's 8x) at the smallest valid latents
        size = x.shape[1] * self.condition_size // registry.image_shape(self.backbone)[0] if self.condition_size \
            else x.shape[1]
        cond = jnp.zeros((batch, size, size, self.condition_channels), jnp.float32)
        return args, {**kwargs, "condition": cond}


# attributes a composite answers with its backbone's (registry.image_shape, class_conditioning,
# learned_variance, guidance inputs)
_DELEGATED = ("input_size", "sample_size", "in_channels", "out_channels", "output_channels", "num_classes",
              "null_class", "num_class_embeds", "class_embed_type", "guidance_embed", "time_cond_proj_dim",
              "learned_sigma")


def _positional_names(module) -> tuple[str, ...]:
    """Names of a backbone's positional inputs after (x, t), so positional calls become keywords."""
    name = type(module).__name__
    if name == "DiT":
        return ("class_labels", "guidance")
    if name == "UNet2DConditionModel":
        return ("encoder_hidden_states",)
    return ("class_labels", "guidance")


def make_adapter(kind: str, backbone: nn.Module, *, width: int = 32, copy_depth: int | None = None,
                 controlnet: nn.Module | None = None) -> nn.Module:
    """The adapter ``kind`` ("gated" or "controlnet") for ``backbone`` (a DiT, UNet2DModel or, with
    ``controlnet``, an SD UNet)."""
    family = type(backbone).__name__
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter {kind!r}; expected one of {ADAPTER_KINDS}")
    if family == "DiT":
        if kind == "gated":
            return GatedDiTAdapter(backbone.depth, backbone.hidden_size, backbone.patch_size, backbone.input_size,
                                   width, backbone.dtype)
        if copy_depth is not None and not 0 <= copy_depth <= backbone.depth:
            raise ValueError(f"adapter copy_depth {copy_depth}: the ControlNet copies 1 to {backbone.depth} of the "
                             f"DiT's {backbone.depth} blocks (0: half of them)")
        return ControlDiTAdapter(backbone, copy_depth or max(1, backbone.depth // 2), width)
    if family == "UNet2DModel" and kind == "gated":
        return GatedUNetAdapter(backbone, width)
    if family == "UNet2DConditionModel" and kind == "controlnet":
        if controlnet is None:
            raise ValueError("a ControlNet adapter for an SD UNet needs the ControlNetModel module")
        return ControlNetAdapter(controlnet)
    raise ValueError(f"no {kind!r} adapter for a {family} (DiT: gated, controlnet; UNet2DModel: gated; "
                     "UNet2DConditionModel: controlnet)")


def adapter_mask(params) -> dict:
    """The trainable mask of a parameter-efficient method: the adapter trains, the backbone is frozen."""
    return {k: jax.tree.map(lambda _: k == "adapter", v) for k, v in params.items()}


def _copy_of_backbone(adapter_params: dict, backbone_params: dict, name: str) -> dict:
    """The adapter's ``name`` subtree (a ControlNet copy) taken from the backbone's params at the same paths."""
    from jdistill.convert.engine import graft

    if name not in adapter_params:
        return adapter_params
    flat_b = traverse_util.flatten_dict(backbone_params)
    wanted = traverse_util.flatten_dict(adapter_params[name])
    subset = traverse_util.unflatten_dict({p: flat_b[p] for p in wanted if p in flat_b})
    return {**adapter_params, name: graft(subset, adapter_params[name])}


def init_adapted(module: Adapted, backbone_params, rng, *, controlnet_params=None) -> dict:
    """Params of ``module`` starting from its backbone's: the backbone's own, a fresh adapter (a DiT
    ControlNet's copy from the backbone's weights; an SD ControlNet from ``controlnet_params``, or
    from the UNet's encoder as diffusers' ``ControlNetModel.from_unet`` does)."""
    from jdistill.convert.engine import graft, init_parts

    args, kwargs = module.example_inputs(1)
    fresh = init_parts(module, ("adapter",), rng, *args, **kwargs)
    adapter = jax.tree.map(jnp.asarray, fresh["adapter"])
    adapter = _copy_of_backbone(adapter, backbone_params, "copy")
    if "controlnet" in adapter:
        source = controlnet_params if controlnet_params is not None else backbone_params
        flat_s = traverse_util.flatten_dict(source)
        flat_a = traverse_util.flatten_dict(adapter["controlnet"])
        adapter["controlnet"] = traverse_util.unflatten_dict(
            {p: flat_s[p] if p in flat_s and flat_s[p].shape == v.shape else v for p, v in flat_a.items()})
    return graft({"backbone": backbone_params, "adapter": adapter}, fresh)


def controlnet_from_unet(unet, conditioning_channels: int = 3,
                         conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)):
    """A ControlNetModel with ``unet``'s encoder (diffusers' ``ControlNetModel.from_unet``): same fields,
    its conditioning image ``2 ** (len(conditioning_embedding_out_channels) - 1)`` times the latents."""
    import dataclasses

    from jdistill.models.controlnet import ControlNetModel
    from jdistill.models.unet_cond import ConditionalEncoder

    names = {f.name for f in dataclasses.fields(ConditionalEncoder)} - {"parent", "name"}
    fields = {n: getattr(unet, n) for n in names}
    for n in ("layers_per_block", "cross_attention_dim"):
        value = fields[n]
        if isinstance(value, (tuple, list)):
            if len(set(value)) != 1:
                raise ValueError(f"diffusers' ControlNet takes one {n}; the UNet has {value}")
            fields[n] = value[0]
    return ControlNetModel(**fields, conditioning_channels=conditioning_channels,
                           conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
