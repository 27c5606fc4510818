"""DiT checkpoints (diffusers and original facebookresearch layouts) -> ``jdistill.models.dit.DiT`` params.

diffusers layout (``DiTTransformer2DModel``; ``transformer/diffusion_pytorch_model.safetensors``):
the Flax module is named after its attributes, so the generic engine rule maps
every key. Its position table is a non-persistent buffer and is not saved.

Original layout (``DiT-XL-2-256x256.pt`` and the training script's checkpoints):

==========================================  ==============================================
original key                                Flax module path (shared-embedder DiT)
==========================================  ==============================================
x_embedder.proj                             pos_embed/proj
t_embedder.mlp.0 / .2                       emb/timestep_embedder/linear_1 / linear_2
y_embedder.embedding_table                  emb/class_embedder/embedding_table
blocks.N.attn.qkv (fused, rows q|k|v)       transformer_blocks_N/attn1/to_q, to_k, to_v
blocks.N.attn.proj                          transformer_blocks_N/attn1/to_out_0
blocks.N.mlp.fc1 / fc2                      transformer_blocks_N/ff/net_0/proj / net_2
blocks.N.adaLN_modulation.1                 transformer_blocks_N/norm1/linear
final_layer.adaLN_modulation.1              proj_out_1 (chunks: shift, scale)
final_layer.linear                          proj_out_2
pos_embed (1, T, D), frozen                 checked against the computed table, dropped
==========================================  ==============================================

The fused qkv splits into equal thirds along its output rows: timm's ``Attention``
reshapes ``qkv(x)`` to (B, T, 3, heads, head_dim), so rows are [q | k | v], each
head-major, which is how diffusers' separate projections are laid out.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.convert import engine
from jdistill.convert.engine import ConversionError
from jdistill.models import dit as dit_model
from jdistill.models import layers
from jdistill.models.dit import LAYOUTS, PRESETS, DiT

# Keys only a DiT of each layout has (used to tell the layouts and other families apart).
_MARKERS = {
    "original": ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                 "final_layer.linear.weight"),
    "diffusers": ("pos_embed.proj.weight", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight",
                  "proj_out_1.weight", "proj_out_2.weight"),
}

# Substrings that give away a checkpoint of another family, for the error message.
_OTHER_FAMILIES = (
    ("adaln_single", "a PixArt transformer"),
    ("time_text_embed", "an SD3 / Flux transformer"),
    ("context_embedder", "an MMDiT (SD3 / Flux) transformer"),
    ("conv_in", "a UNet or VAE"),
    ("text_model.", "a CLIP text encoder"),
    ("encoder.block.", "a T5 encoder"),
)


def unwrap(checkpoint: Mapping) -> Mapping:
    """The state dict inside a training checkpoint: the EMA weights when present (what the
    original sampling script loads), else ``model``; a plain state dict is returned as is."""
    if isinstance(checkpoint, Mapping):
        for key in ("ema", "model", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    return checkpoint


def detect_layout(keys) -> str:
    """"original" or "diffusers" from a DiT state dict's keys; ConversionError for anything else."""
    keys = set(keys)
    for layout, markers in _MARKERS.items():
        if all(k in keys for k in markers):
            return layout
    guess = next((what for marker, what in _OTHER_FAMILIES if any(marker in k for k in keys)), None)
    sample = sorted(keys)[:8]
    raise ConversionError(
        "not a DiT checkpoint" + (f" (it looks like {guess})" if guess else "") + ": it has neither the "
        f"original keys {list(_MARKERS['original'])} nor the diffusers keys {list(_MARKERS['diffusers'])}; "
        f"its first keys are {sample}")


def _check_pos_embed(module: DiT):
    """A rule that compares a stored position table with the one the module computes, then drops it.
    A different table means a model trained with other positions: refuse it rather than
    silently run with ours."""
    grid = module.input_size // module.patch_size
    expected = layers.sincos_pos_embed_2d(module.hidden_size, grid, grid)

    def rule(key, tensor):
        if key not in ("pos_embed", "pos_embed.pos_embed"):
            return None
        stored = engine._to_numpy(tensor)  # (1, T, D) as saved
        if stored.size != expected.size:
            raise ConversionError(f"{key}: stored position table {tuple(np.shape(tensor))} does not fit a "
                                  f"{grid}x{grid} grid of {module.hidden_size} channels (model input_size "
                                  f"{module.input_size}, patch {module.patch_size})")
        err = float(np.abs(stored.reshape(expected.shape) - expected).max())
        if err > 1e-5:
            raise ConversionError(f"{key}: stored position table differs from the 2D sin-cos table by {err:.3g} "
                                  "(max abs); this checkpoint was trained with other positions")
        return []

    return rule


def diffusers_rules(module: DiT) -> list:
    return [_check_pos_embed(module)]


def original_rules(module: DiT) -> list:
    r, blk = engine.rename, r"^blocks\.(\d+)\."
    return [
        _check_pos_embed(module),
        r(r"^x_embedder\.proj\.", "pos_embed.proj."),
        r(r"^t_embedder\.mlp\.0\.", "emb.timestep_embedder.linear_1."),
        r(r"^t_embedder\.mlp\.2\.", "emb.timestep_embedder.linear_2."),
        r(r"^y_embedder\.embedding_table\.", "emb.class_embedder.embedding_table."),
        r(blk + r"attn\.qkv\.", r"transformer_blocks.\1.attn1.qkv."),
        r(blk + r"attn\.proj\.", r"transformer_blocks.\1.attn1.to_out.0."),
        r(blk + r"mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
        r(blk + r"mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
        r(blk + r"adaLN_modulation\.1\.", r"transformer_blocks.\1.norm1.linear."),
        r(r"^final_layer\.adaLN_modulation\.1\.", "proj_out_1."),
        r(r"^final_layer\.linear\.", "proj_out_2."),
        # after the rename above (the engine passes a renamed key on to the later rules)
        engine.split(r"\.attn1\.qkv\.(weight|bias)$", ("to_q", "to_k", "to_v")),
    ]


def _check_module_fits(layout: str, module: DiT):
    """The weights of a layout only mean that layout's network: refuse a module that would
    load them without error but compute something else."""
    want = LAYOUTS[layout]
    problems = [f"{f}={getattr(module, f)!r} (this layout needs {want[f]!r})"
                for f in ("shared_embedder", "freq_shift") if getattr(module, f) != want[f]]
    if layout == "original" and module.norm_eps != want["norm_eps"]:
        problems.append(f"norm_eps={module.norm_eps!r} (the original DiT uses {want['norm_eps']!r})")
    if problems:
        raise ConversionError(f"a {layout}-layout DiT checkpoint does not fit this module: " + "; ".join(problems)
                              + f"; build it with dit_config(..., layout={layout!r})"
                              + (" or config_from_diffusers(config.json)" if layout == "diffusers"
                                 else " or config_from_original(state_dict)"))


def load_dit_params(state_dict: Mapping, module: DiT, *, dtype=None, layout: str | None = None):
    """Params for ``module`` from a DiT state dict of either layout (detected from its keys
    unless ``layout`` is given). Every missing, unexpected or mis-shaped key, a stored
    position table that is not the sin-cos one, and a module configured for the other
    layout raise :class:`ConversionError`. Returns a tree of numpy arrays (blocks stacked for a
    ``scan_blocks`` module: the checkpoint is read block by block, then stacked)."""
    state_dict = unwrap(state_dict)
    layout = layout or detect_layout(state_dict.keys())
    _check_module_fits(layout, module)
    per_block = module.clone(scan_blocks=False)
    rules = original_rules(per_block) if layout == "original" else diffusers_rules(per_block)
    target = engine.abstract_params(per_block, **dit_model.example_inputs(per_block))
    params, _ = engine.convert_state_dict(state_dict, target, rules, what=f"DiT checkpoint ({layout} layout)",
                                          dtype=dtype)
    return module.scanned_params(params)


# diffusers' DiTTransformer2DModel defaults: a Transformer2DModel config with norm_type
# "ada_norm_zero" is loaded by diffusers as that class, so its missing keys take these.
_DIFFUSERS_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
                           num_layers=28, attention_bias=True, sample_size=32, patch_size=2,
                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                           norm_elementwise_affine=False, norm_eps=1e-5)
_ACTIVATIONS = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}


def config_from_diffusers(config: Mapping | str | os.PathLike, **overrides) -> DiT:
    """The DiT module for a diffusers ``DiTTransformer2DModel`` / ``Transformer2DModel`` config
    (a dict, or the path of its config.json or of the folder holding it). ``overrides``
    set other fields (``dtype``, ``guidance_embed``, ...)."""
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        with open(os.path.join(path, "config.json") if os.path.isdir(path) else path) as f:
            config = json.load(f)
    cls = config.get("_class_name", "DiTTransformer2DModel")
    if cls not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise InvalidArgument(f"not a DiT config: _class_name {cls!r}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    if c["norm_type"] != "ada_norm_zero":
        raise InvalidArgument(f"DiT needs norm_type 'ada_norm_zero', config has {c['norm_type']!r}")
    for key in ("cross_attention_dim", "num_vector_embeds"):
        if config.get(key) is not None:
            raise InvalidArgument(f"a class-conditional DiT has no {key}; config has {config[key]!r}")
    if c["patch_size"] is None or c["num_embeds_ada_norm"] is None:
        raise InvalidArgument("a DiT config needs patch_size and num_embeds_ada_norm")
    if c["activation_fn"] not in _ACTIVATIONS:
        raise InvalidArgument(f"activation_fn {c['activation_fn']!r} not supported; known: {sorted(_ACTIVATIONS)}")
    fields = dict(
        input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
        out_channels=c["out_channels"] or c["in_channels"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
        num_heads=c["num_attention_heads"], num_classes=c["num_embeds_ada_norm"],
        attention_bias=c["attention_bias"], activation=_ACTIVATIONS[c["activation_fn"]],
        norm_elementwise_affine=c["norm_elementwise_affine"],
        **{**LAYOUTS["diffusers"], "norm_eps": c["norm_eps"]},
    )
    fields.update(overrides)
    return DiT(**fields)


def config_from_original(state_dict: Mapping, num_heads: int | None = None, input_size: int | None = None,
                         **overrides) -> DiT:
    """The DiT module for an original-layout state dict, read off its shapes. ``num_heads``
    is not in the weights: it defaults to the paper's for the preset hidden sizes;
    ``input_size`` defaults to the stored position table's grid."""
    sd = unwrap(state_dict)
    if detect_layout(sd.keys()) != "original":
        raise ConversionError("config_from_original needs an original-layout DiT state dict")
    shape = lambda k: tuple(np.shape(sd[k]))  # noqa: E731
    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    depth = len({k.split(".")[1] for k in sd.keys() if k.startswith("blocks.")})
    if num_heads is None:
        by_width = {w: h for _, w, h in PRESETS.values()}
        if hidden not in by_width:
            raise InvalidArgument(f"hidden size {hidden} is not a DiT preset's: pass num_heads")
        num_heads = by_width[hidden]
    if input_size is None:
        if "pos_embed" not in sd:
            raise InvalidArgument("no stored pos_embed to read the input size from: pass input_size")
        input_size = int(round(np.sqrt(shape("pos_embed")[-2]))) * patch
    fields = dict(
        input_size=input_size, patch_size=patch, in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0] // (patch * patch), hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / hidden,
        # the original LabelEmbedder adds the null row whenever label dropout is on (always, in the paper)
        num_classes=shape("y_embedder.embedding_table.weight")[0] - 1, **LAYOUTS["original"],
    )
    fields.update(overrides)
    return DiT(**fields)


# ---------------------------------------------------------------- the converter protocol
# (shared by every family; see jdistill.convert.registry)

# The original DiT constructor's arguments: the config jdistill writes for a bare original .pt
# (registry.detect_checkpoint), "_class_name": "DiT".
_ORIGINAL_ARGS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                  "num_classes", "learn_sigma")


def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> DiT:
    """The module for a diffusers ``DiTTransformer2DModel`` / ``Transformer2DModel`` config, or
    for an original-layout config (``_class_name`` "DiT" and the original constructor's
    arguments, as written for a converted ``DiT-XL-2-256x256.pt``)."""
    if config.get("_class_name") == "DiT":
        absent = [k for k in _ORIGINAL_ARGS if k not in config]
        if absent:
            raise InvalidArgument(f"an original DiT config needs {absent}")
        c = {k: config[k] for k in _ORIGINAL_ARGS}
        return DiT(input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
                   out_channels=c["in_channels"] * (2 if c["learn_sigma"] else 1), hidden_size=c["hidden_size"],
                   depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
                   num_classes=c["num_classes"], **LAYOUTS["original"], dtype=dtype, param_dtype=param_dtype)
    return config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype)


def load_params(state_dict: Mapping, module: DiT):
    """:func:`load_dit_params` (either layout, detected from the keys), in the module's param dtype."""
    return load_dit_params(state_dict, module)


def export_rules(module: DiT) -> list:
    """Rules for ``engine.flax_to_torch_state_dict`` towards diffusers' ``DiTTransformer2DModel``.
    An original-layout module has no diffusers equivalent: its shared embedder and timestep
    frequencies are another network (see jdistill.models.dit), so it is refused."""
    if module.shared_embedder:
        raise ConversionError("an original-layout DiT (shared embedder, freq_shift 0) cannot be exported as a "
                              "diffusers DiTTransformer2DModel: diffusers computes a different network")
    return diffusers_rules(module)


def example_inputs(module: DiT, batch: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) for ``module.init`` / ``engine.abstract_params``."""
    return (), dit_model.example_inputs(module, batch)
