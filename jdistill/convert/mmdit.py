"""diffusers ``SD3Transformer2DModel`` (SD3, SD3.5) checkpoints -> ``jdistill.models.mmdit`` params.

The family protocol: :func:`module_from_config`, :func:`load_params`, :func:`export_rules`,
:func:`example_inputs`.

The Flax module carries diffusers' attribute names, so the generic engine rule maps every
key of a ``save_pretrained`` checkpoint (``transformer/diffusion_pytorch_model*.safetensors``),
including the persistent position buffer ``pos_embed.pos_embed`` (1, m*m, D), which is a
param of the Flax module. No family rules are needed either way.

A checkpoint of another family (Flux, DiT, PixArt, an SD3 ControlNet, an original
Stability single-file SD3, a UNet, a text encoder) is named as such in the
:class:`ConversionError` before any key is compared; within the family, the engine names
every missing, unexpected and mis-shaped key (e.g. a module built without the
checkpoint's ``dual_attention_layers`` or ``qk_norm`` lists the ``attn2`` / ``norm_q`` keys).
"""

from __future__ import annotations

import inspect
import re
from typing import Mapping

import jax.numpy as jnp

from jdistill.errors import InvalidArgument
from jdistill.convert import engine
from jdistill.convert.engine import ConversionError
from jdistill.models.mmdit import SD3Transformer2DModel

# diffusers' SD3Transformer2DModel.__init__ defaults: a config.json leaves out keys at their default.
_DEFAULTS = {name: f.default for name, f in inspect.signature(SD3Transformer2DModel).parameters.items()
             if name not in ("dtype", "param_dtype", "parent", "name")}

# Every diffusers SD3 transformer has these.
_MARKERS = ("pos_embed.proj.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight")

# Key segments that give away a checkpoint of another family (first match wins). Matched at a
# segment boundary: "t_embedder." must not match SD3's own "text_embedder.".
_OTHER_FAMILIES = (
    ("joint_blocks.", "an original Stability SD3 single-file checkpoint (convert the file itself: "
                      "jdistill.convert.single_file reads that layout)"),
    ("single_transformer_blocks.", "a Flux transformer"),
    ("controlnet_blocks.", "an SD3 ControlNet"),
    ("adaln_single.", "a PixArt transformer"),
    ("norm1.emb.", "a DiT transformer (diffusers layout)"),
    ("t_embedder.", "a DiT checkpoint (original layout)"),
    ("time_embedding.", "a UNet"),
    ("conv_in.", "a UNet or VAE"),
    ("text_model.", "a CLIP text encoder"),
    ("encoder.block.", "a T5 encoder"),
)


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> SD3Transformer2DModel:
    """The Flax module for a diffusers ``SD3Transformer2DModel`` config.json dict. Keys it leaves
    out take diffusers' defaults; a key that is not one of the model's (other than ``_``
    metadata) raises ValueError rather than being ignored, since it could change the network."""
    cls = config.get("_class_name", "SD3Transformer2DModel")
    if cls != "SD3Transformer2DModel":
        raise InvalidArgument(f"not an SD3 transformer config: _class_name {cls!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
    if unknown:
        raise InvalidArgument(f"SD3Transformer2DModel config has keys this module does not implement: {unknown}")
    fields = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    fields["dual_attention_layers"] = tuple(int(i) for i in fields["dual_attention_layers"] or ())
    return SD3Transformer2DModel(**fields, dtype=dtype, param_dtype=param_dtype)


def example_inputs(module: SD3Transformer2DModel, batch: int = 1):
    """``(args, kwargs)`` of the right shapes and dtypes for ``module.init`` / ``abstract_params``."""
    return module.example_inputs(batch)


def export_rules(module: SD3Transformer2DModel) -> list:
    """None: every param is named as its diffusers key, the position table included."""
    return []


def check_family(keys) -> None:
    """ConversionError unless ``keys`` look like a diffusers SD3 transformer's; names the family
    a foreign checkpoint seems to come from."""
    keys = list(keys)
    for marker, what in _OTHER_FAMILIES:
        rx = re.compile(r"(^|\.)" + re.escape(marker))
        hit = next((k for k in keys if rx.search(k)), None)
        if hit is not None:
            raise ConversionError(f"not an SD3Transformer2DModel checkpoint: it looks like {what} (key {hit!r})")
    if not any(k in keys for k in _MARKERS):
        raise ConversionError(f"not an SD3Transformer2DModel checkpoint: it has none of {list(_MARKERS)}; "
                              f"its first keys are {sorted(keys)[:8]}")


def load_params(state_dict: Mapping, module: SD3Transformer2DModel):
    """Params (numpy leaves in the module's ``param_dtype``) for ``module`` from a diffusers SD3
    transformer state dict (a dict of tensors / arrays or a lazy mapping of them). Raises
    :class:`ConversionError` naming a foreign family, or every missing, unexpected and
    mis-shaped key. For a ``scan_blocks`` module the blocks are read one by one, then stacked."""
    check_family(state_dict.keys())
    per_block = module.clone(scan_blocks=False)
    args, kwargs = example_inputs(per_block)
    target = engine.abstract_params(per_block, *args, **kwargs)
    params, _ = engine.convert_state_dict(state_dict, target, export_rules(per_block),
                                          what="SD3Transformer2DModel checkpoint")
    return module.scanned_params(params)


# ---------------------------------------------------------------- the original (Stability) layout
#
# SD3 / SD3.5 single files (``model.diffusion_model.joint_blocks.*``) fuse q / k / v, name the
# two streams x_block / context_block, and order the final adaLN (and the last block's
# pre-only context adaLN) as (shift, scale) where diffusers has (scale, shift).

_ORIGINAL_GLOBAL = {"x_embedder.proj": "pos_embed.proj", "pos_embed": "pos_embed.pos_embed",
                    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
                    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
                    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
                    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
                    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
_ORIGINAL_BLOCK = {"x_block.attn.qkv": "attn.qkv", "context_block.attn.qkv": "attn.add_qkv",
                   "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
                   "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
                   "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
                   "x_block.attn2.qkv": "attn2.qkv", "x_block.attn2.ln_q": "attn2.norm_q",
                   "x_block.attn2.ln_k": "attn2.norm_k", "x_block.attn2.proj": "attn2.to_out.0",
                   "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear",
                   "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
                   "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2"}


def original_table(num_layers: int) -> dict[str, str]:
    """Original module name -> diffusers module name (the fused ``qkv`` as ``qkv`` / ``add_qkv``,
    split by :func:`original_rules`)."""
    table = dict(_ORIGINAL_GLOBAL)
    for i in range(num_layers):
        table.update({f"joint_blocks.{i}.{a}": f"transformer_blocks.{i}.{b}" for a, b in _ORIGINAL_BLOCK.items()})
    return table


def original_rules(config: Mapping) -> list:
    """Rules reading an original-layout SD3 / SD3.5 state dict (``model.diffusion_model.``
    removed) as the diffusers keys of ``config``."""
    last = int(config["num_layers"]) - 1
    return [engine.rename_table(original_table(last + 1), "original SD3 MMDiT"),
            engine.split(r"\.attn2?\.qkv\.", ("to_q", "to_k", "to_v")),
            engine.split(r"\.attn\.add_qkv\.", ("add_q_proj", "add_k_proj", "add_v_proj")),
            engine.swap_halves(rf"^(norm_out\.linear|transformer_blocks\.{last}\.norm1_context\.linear)\.")]


def config_from_original(shapes: Mapping[str, tuple], sample_size: int = 128) -> dict:
    """A diffusers ``SD3Transformer2DModel`` config from an original-layout state dict's shapes:
    heads of width 64 (every SD3 / SD3.5's); ``sample_size`` (not in the weights) is SD3's 128, or
    the largest latent the position table covers when that is smaller."""
    width, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")})
    positions = shapes["pos_embed"][1]
    side = int(round(positions ** 0.5))
    if side * side != positions or width % 64:
        raise InvalidArgument(f"an SD3 transformer with {positions} positions and width {width} is not one this reader "
                         "knows (a square position table, 64-wide heads)")
    return {"_class_name": "SD3Transformer2DModel", "sample_size": min(sample_size, side * patch), "patch_size": patch,
            "in_channels": in_channels, "num_layers": len(layers), "attention_head_dim": 64,
            "num_attention_heads": width // 64, "joint_attention_dim": shapes["context_embedder.weight"][1],
            "caption_projection_dim": shapes["context_embedder.weight"][0],
            "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
            "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch), "pos_embed_max_size": side,
            "dual_attention_layers": sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k}),
            "qk_norm": "rms_norm" if any(".attn.ln_q." in k for k in shapes) else None}
