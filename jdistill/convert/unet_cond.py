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

from jdistill.errors import InvalidArgument
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
        raise InvalidArgument(f"config is for {found}, not {class_name}")
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
        raise InvalidArgument(f"{class_name} options not supported by jdistill: {refused}")
    if unknown:
        raise InvalidArgument(f"{class_name} config keys not supported by jdistill: {sorted(unknown)}")
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
            raise InvalidArgument("a guidance_embed=True UNet2DConditionModel needs `rng` to initialise its guidance embedding "
                             "(a diffusers checkpoint has none)")
        embed = layers.GuidanceEmbedding(module.time_embed_dim, dtype=module.dtype, param_dtype=module.param_dtype)
        params = engine.add_fresh_submodule(params, "guidance_embedder", embed, guidance_target, rng,
                                            jnp.zeros((1,), jnp.float32), dtype=dtype)
    return params


# ---------------------------------------------------------------- the original (LDM / SGM) layout
#
# Single-file SD 1.x / 2.x / SDXL checkpoints (``model.diffusion_model.*``) and kohya's SDXL
# LoRA names use the original UNet's module names: numbered ``input_blocks`` /
# ``middle_block`` / ``output_blocks`` whose position, given the config, says which diffusers
# block, resnet or attention they are. One table per config maps them; the same table serves
# checkpoint keys and LoRA module names.

LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_table(config: Mapping) -> dict[str, str]:
    """Original module name -> diffusers module name for the UNet ``config`` describes (a
    diffusers config dict), resnet inner names included. Attention blocks keep their inner
    names (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ...), which both layouts share."""
    unet = module_from_config(config)
    n, layers = len(unet.block_out_channels), unet.layers
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if unet.addition_embed_type == "text_time":
        table.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    resnets = {}
    i = 1
    for b, name in enumerate(unet.down_block_types):
        for j in range(layers[b]):
            resnets[f"input_blocks.{i}.0"] = f"down_blocks.{b}.resnets.{j}"
            if name.endswith("CrossAttnDownBlock2D"):
                table[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
            i += 1
        if b < n - 1:
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            i += 1
    if unet.mid_block_type == "UNetMidBlock2DCrossAttn":
        resnets.update({"middle_block.0": "mid_block.resnets.0", "middle_block.2": "mid_block.resnets.1"})
        table["middle_block.1"] = "mid_block.attentions.0"
    elif unet.mid_block_type == "UNetMidBlock2D":
        resnets.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.resnets.1"})
    k = 0
    for b, name in enumerate(unet.up_block_types):
        attention = name.endswith("CrossAttnUpBlock2D")
        count = layers[n - 1 - b] + 1
        for j in range(count):
            resnets[f"output_blocks.{k}.0"] = f"up_blocks.{b}.resnets.{j}"
            if attention:
                table[f"output_blocks.{k}.1"] = f"up_blocks.{b}.attentions.{j}"
            if b < n - 1 and j == count - 1:
                table[f"output_blocks.{k}.{2 if attention else 1}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
            k += 1
    for old, new in resnets.items():
        table[old] = new
        table.update({f"{old}.{a}": f"{new}.{b}" for a, b in LDM_RESNET.items()})
    return table


def ldm_rules(config: Mapping) -> list:
    """Rules reading an original-layout UNet state dict (``model.diffusion_model.`` removed) as
    the diffusers keys of ``config``; a key the table does not know stays as it is, and the
    engine names it as unexpected."""
    return [engine.rename_table(ldm_table(config), "original SD UNet")]


def _ldm_index(key: str) -> int:
    return int(key.split(".")[1])


def config_from_ldm(shapes: Mapping[str, tuple], *, heads: str, sample_size: int,
                    pooled_dim: int | None = None, time_ids: int = 6) -> dict:
    """A diffusers ``UNet2DConditionModel`` config read off an original-layout UNet's tensor
    shapes (``model.diffusion_model.`` removed). What the weights cannot say comes from the
    model family, named by the caller:

    * ``heads``: ``"v1"`` (SD 1.x: 8 heads in every block, diffusers' ``attention_head_dim=8``)
      or ``"head_dim_64"`` (SD 2.x / SDXL: heads of width 64, one count per block);
    * ``sample_size``: the latent size the model was trained at;
    * SDXL's ``addition_time_embed_dim``: from the added embedding's input width, the pooled
      text width ``pooled_dim`` and the number of ``time_ids`` (6; the refiner's 5), else
      SDXL's published 256.
    """
    def has(prefix):
        return any(k.startswith(prefix) for k in shapes)

    def depth(prefix):
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    conv_in = shapes["input_blocks.0.0.weight"]
    levels, current = [], []
    ids = sorted({_ldm_index(k) for k in shapes if k.startswith("input_blocks.")} - {0})
    for i in ids:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append(current)
            current = []
            continue
        attention = has(f"input_blocks.{i}.1.")
        current.append((shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0], attention,
                        depth(f"input_blocks.{i}.1.transformer_blocks.") if attention else 1))
    levels.append(current)
    if any(not level for level in levels):
        raise InvalidArgument("an input block level without resnets")
    channels, counts, down_types, depths = [], [], [], []
    for b, level in enumerate(levels):
        if len({c for c, _, _ in level}) != 1 or len({a for _, a, _ in level}) != 1:
            raise InvalidArgument(f"input level {b} mixes widths or block kinds: {level}")
        if len({d for _, _, d in level}) != 1:
            raise InvalidArgument(f"input level {b} has transformers of different depths {[d for *_, d in level]}")
        channels.append(level[0][0])
        counts.append(len(level))
        down_types.append("CrossAttnDownBlock2D" if level[0][1] else "DownBlock2D")
        depths.append(level[0][2])
    n = len(levels)
    out_ids = sorted({_ldm_index(k) for k in shapes if k.startswith("output_blocks.")})
    up_types, k = [], 0
    for b in range(n):
        count = counts[n - 1 - b] + 1
        kinds = {has(f"output_blocks.{j}.1.") and not has(f"output_blocks.{j}.1.conv.") for j in range(k, k + count)}
        if len(kinds) != 1:
            raise InvalidArgument(f"output level {b} mixes blocks with and without attention")
        up_types.append("CrossAttnUpBlock2D" if kinds.pop() else "UpBlock2D")
        for j in range(k, k + count):
            if up_types[-1] == "CrossAttnUpBlock2D" and depth(f"output_blocks.{j}.1.transformer_blocks.") != \
                    depths[n - 1 - b]:
                raise InvalidArgument("the up path's transformer depths are not the down path's reversed "
                                 "(reverse_transformer_layers_per_block), which this reader does not infer")
        k += count
    if k != len(out_ids):
        raise InvalidArgument(f"{len(out_ids)} output blocks, expected {k} for layers {counts}")
    attn_key = next(k for k in shapes if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in shapes if k.endswith(".proj_in.weight"))
    mid = None
    if has("middle_block."):
        mid = "UNetMidBlock2DCrossAttn" if has("middle_block.1.transformer_blocks.") else "UNetMidBlock2D"
        if mid == "UNetMidBlock2DCrossAttn" and depth("middle_block.1.transformer_blocks.") != depths[-1]:
            raise InvalidArgument("the mid block's transformer depth differs from the last level's")
    if heads == "v1":
        head_counts = 8
    elif heads == "head_dim_64":
        head_counts = [c // 64 for c in channels]
    else:
        raise InvalidArgument(f"heads {heads!r}: 'v1' or 'head_dim_64'")
    config = {
        "_class_name": FAMILY, "sample_size": sample_size, "in_channels": conv_in[1], "out_channels":
            shapes["out.2.weight"][0], "down_block_types": down_types, "up_block_types": up_types,
        "mid_block_type": mid, "block_out_channels": channels,
        "layers_per_block": counts[0] if len(set(counts)) == 1 else counts,
        "cross_attention_dim": shapes[attn_key][1], "attention_head_dim": head_counts,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "conv_in_kernel": conv_in[2], "conv_out_kernel": shapes["out.2.weight"][2],
    }
    if "label_emb.0.0.weight" in shapes:
        width = shapes["label_emb.0.0.weight"][1]
        dim = 256
        if pooled_dim is not None:
            dim, rest = divmod(width - pooled_dim, time_ids)
            if rest or dim <= 0:
                raise InvalidArgument(f"the added embedding takes {width} features, which is not pooled text "
                                 f"{pooled_dim} + {time_ids} time ids")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=dim,
                      projection_class_embeddings_input_dim=width)
    elif has("label_emb."):
        raise InvalidArgument("a class-label embedding (label_emb, e.g. the x4 upscaler) is not a text-to-image UNet "
                         "jdistill reads from a single file")
    return config
