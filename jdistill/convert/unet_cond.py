"""diffusers ``UNet2DConditionModel`` checkpoints (SD 1.x / 2.x / SDXL ``unet/``) ->
:class:`jdistill.models.unet_cond.UNet2DConditionModel` params.

The Flax module carries diffusers' attribute names, so the engine's generic rule maps every
key: there are no family rules. The family protocol (called by name by the registry):

* :func:`module_from_config` (a ``config.json`` dict -> module; unsupported options raise a
  ValueError naming them),
* :func:`load_params` (state dict -> params; every missing, unexpected or mis-shaped key, and
  a checkpoint of another family, raise a ``ConversionError`` naming them),
* :func:`export_rules`, :func:`example_inputs`.

The helpers shared with the ControlNet and VAE converters (reading a diffusers config,
telling checkpoint families apart) live here too.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp

from jdistill.convert import engine
from jdistill.models import layers
from jdistill.models.unet_cond import UNet2DConditionModel

FAMILY = "UNet2DConditionModel"

# config keys of options jdistill does not implement: accepted only at the value that turns
# them off (diffusers' default), refused by name otherwise
UNSUPPORTED_AT_DEFAULT = {
    "dual_cross_attention": False,  # DualTransformer2DModel (versatile diffusion)
    "encoder_hid_dim": None,  # Kandinsky / DeepFloyd IF text and image projections
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",  # Fourier time features
    "attention_type": "default",  # GLIGEN gated attention
}
# config keys that only configure blocks / embeddings refused elsewhere (ResnetDownsample and
# SimpleCrossAttn blocks, the "text" addition embedding): inert for every supported model
INERT_KEYS = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
              "mid_block_only_cross_attention", "addition_embed_type_num_heads")

# (what a checkpoint looks like, key substrings only it has), most specific first
FAMILY_MARKERS = (
    ("a ControlNetModel", ("controlnet_cond_embedding.", "controlnet_mid_block.")),
    ("a T5 text encoder", ("encoder.block.", "shared.weight")),
    ("a CLIP text encoder", ("text_model.",)),
    ("an AutoencoderKL (VAE)", ("encoder.conv_in.", "decoder.conv_in.", "post_quant_conv.")),
    ("an SD3 / Flux transformer", ("context_embedder.", "time_text_embed.")),
    ("a DiT / PixArt transformer", ("pos_embed.proj.", "x_embedder.", "adaln_single.")),
    ("a UNet2DConditionModel", (".attn2.to_k.", "add_embedding.")),
    ("a UNet2DModel (a UNet without cross-attention)", ("up_blocks.",)),
)


def _tupled(value):
    """JSON lists -> tuples, nested ones too (Flax fields must be hashable)."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def diffusers_fields(config: Mapping, cls, class_name: str, unsupported_at_default: Mapping = (),
                     inert: Iterable[str] = ()) -> dict:
    """Fields of the Flax module ``cls`` from a diffusers config.json dict for ``class_name``.

    "_"-prefixed keys are bookkeeping and skipped; ``inert`` keys are dropped; an
    ``unsupported_at_default`` key is accepted only at its default; any other key the module
    has no field for raises a ValueError naming it (a silently ignored option would change
    the network). The module is built once, so invalid values raise here with its message.
    """
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"config is for {found}, not {class_name}")
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype", "param_dtype", "guidance_embed",
                                                         "remat"}
    fields, unknown, refused = {}, [], []
    for key, value in config.items():
        if key.startswith("_") or key in inert:
            continue
        if key in unsupported_at_default:
            if value != unsupported_at_default[key]:
                refused.append(f"{key}={value!r}")
            continue
        if key not in known:
            unknown.append(key)
            continue
        fields[key] = _tupled(value)
    if refused:
        raise ValueError(f"{class_name} options not supported by jdistill: {refused}")
    if unknown:
        raise ValueError(f"{class_name} config keys not supported by jdistill: {sorted(unknown)}")
    cls(**fields)  # validates the values now, with the module's messages
    return fields


def checkpoint_family(keys: Iterable[str]) -> str | None:
    """What kind of diffusers / transformers checkpoint a state dict's keys look like, or None."""
    keys = list(keys)
    for what, markers in FAMILY_MARKERS:
        if any(m in k for k in keys for m in markers):
            return what
    return None


def convert_checked(state_dict: Mapping, target, rules, family: str, dtype=None):
    """``engine.convert_state_dict`` for a ``family`` checkpoint; when it does not fit and its
    keys look like another family's, the ConversionError says which."""
    try:
        params, _ = engine.convert_state_dict(state_dict, target, rules, what=f"{family} checkpoint", dtype=dtype)
    except engine.ConversionError as err:
        found = checkpoint_family(state_dict.keys())
        if found is not None and family not in found:
            raise engine.ConversionError(f"not a {family} checkpoint: its keys look like {found}.\n{err}") from None
        raise
    return params


def config_from_diffusers(config: Mapping) -> dict:
    """Keyword arguments for :class:`UNet2DConditionModel` from a diffusers config.json dict."""
    return diffusers_fields(config, UNet2DConditionModel, FAMILY, UNSUPPORTED_AT_DEFAULT, INERT_KEYS)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> UNet2DConditionModel:
    """The Flax module for a diffusers ``UNet2DConditionModel`` config.json dict. A
    guidance-embedding student is ``module_from_config(cfg).clone(guidance_embed=True)``."""
    return UNet2DConditionModel(**config_from_diffusers(config), dtype=dtype, param_dtype=param_dtype)


def example_inputs(module: UNet2DConditionModel, batch: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the right shapes for ``module.init`` / ``jax.eval_shape``."""
    return module.example_inputs(batch)


def export_rules(module: UNet2DConditionModel) -> list:
    """Params -> diffusers keys needs nothing beyond the generic rule."""
    return []


def load_params(state_dict: Mapping, module: UNet2DConditionModel, *, rng: jax.Array | None = None, dtype=None):
    """Flax params for ``module`` from a diffusers state dict (a dict of tensors / arrays, or a
    lazy mapping such as a safetensors handle: tensors are read one at a time).

    A ``guidance_embed=True`` module is a student made from a teacher checkpoint, which has no
    guidance embedding: that one module is initialised from ``rng`` (its zero-initialised last
    layer keeps the student equal to the teacher until it trains).
    """
    args, kwargs = module.example_inputs()
    target = dict(engine.abstract_params(module, *args, **kwargs))
    guidance_target = target.pop("guidance_embedder", None)
    params = convert_checked(state_dict, target, export_rules(module), FAMILY, dtype)
    if guidance_target is not None:
        if rng is None:
            raise ValueError("a guidance_embed=True UNet2DConditionModel needs `rng` to initialise its guidance embedding "
                             "(a diffusers checkpoint has none)")
        embed = layers.GuidanceEmbedding(module.time_embed_dim, dtype=module.dtype, param_dtype=module.param_dtype)
        params = engine.add_fresh_submodule(params, "guidance_embedder", embed, guidance_target, rng,
                                            jnp.zeros((1,), jnp.float32), dtype=dtype)
    return params
