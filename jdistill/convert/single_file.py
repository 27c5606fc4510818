"""Single-file checkpoints in their original layouts: what is in them, and how each part reads.

A single ``.safetensors`` / ``.ckpt`` of Stable Diffusion 1.x / 2.x / SDXL (CompVis / SGM
layout) or SD3 / SD3.5 (Stability's layout) holds the denoiser, the VAE and the text
encoders under prefixes. :func:`detect` names the layout from the keys;
:func:`plan_components` finds each component, its config (read off the tensor shapes, or
taken from a diffusers pipeline folder given as ``config``) and a lazy view that reads the
original keys as the diffusers / transformers keys of that config, through the family's own
rules (``unet_cond.ldm_rules``, ``vae.ldm_rules``, ``clip.openclip_rules``,
``mmdit.original_rules``). The family converters then convert the views exactly as they
convert diffusers folders, so the params are the same trees.

What the weights cannot say comes from the layout and is named here: head counts (SD 1.x:
8 per block; the others: 64-wide heads), the training resolution (``sample_size``), the VAE's
latent scaling, CLIP's legacy ``eos_token_id`` and activations (OpenAI CLIP-L: quick_gelu;
OpenCLIP: gelu). Pass a pipeline folder as ``config`` to use its configs instead (and to get
its scheduler and tokenizers, which no single file holds).

| layout | denoiser | VAE | text encoders |
|---|---|---|---|
| ``sd1`` | ``model.diffusion_model.`` | ``first_stage_model.`` | ``cond_stage_model.transformer.`` (CLIP-L) |
| ``sd2`` | same | same | ``cond_stage_model.model.`` (OpenCLIP-H, last layer dropped) |
| ``sdxl`` | same | same | ``conditioner.embedders.0.transformer.`` (CLIP-L), ``conditioner.embedders.1.model.`` (bigG) |
| ``sdxl-refiner`` | same | same | ``conditioner.embedders.0.model.`` (bigG) as ``text_encoder_2`` |
| ``sd3`` | ``model.diffusion_model.`` (MMDiT) | ``first_stage_model.`` | ``text_encoders.clip_l / clip_g / t5xxl.transformer.`` |

Keys no component reads (EMA copies ``model_ema.*``, schedule buffers ``alphas_cumprod`` /
``betas``, position-id buffers, SD 2.x's last text layer) are listed as unused. Refused by
name: original-layout ControlNets, Flux and other single-file families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.convert import clip, engine, mmdit, t5, unet_cond, vae
from jdistill.convert.engine import RuledView
from jdistill.convert.io import CONFIG_NAME, PIPELINE_INDEX, read_json
from jdistill.convert.registry import UnsupportedModel

UNET = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")

# layout -> what the weights do not say: (UNet heads rule, latent sample size, VAE image size, VAE scaling)
_SD = {"sd1": ("v1", 64, 512, 0.18215), "sd2": ("head_dim_64", 96, 768, 0.18215),
       "sdxl": ("head_dim_64", 128, 1024, 0.13025), "sdxl-refiner": ("head_dim_64", 128, 1024, 0.13025)}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline", "sd3": "StableDiffusion3Pipeline"}
_SD3_VAE = dict(sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)

# (key marker, what it is) of single files jdistill does not read
_REFUSED = (("control_model.", "an original-layout ControlNet (convert a diffusers ControlNetModel folder)"),
            ("double_blocks.", "a Flux transformer"),
            ("model.diffusion_model.label_emb.weight", "a class-conditioned SD UNet (the x4 upscaler)"))


def detect(keys) -> str | None:
    """The layout of a single-file checkpoint (``"sd1"``, ``"sd2"``, ``"sdxl"``,
    ``"sdxl-refiner"``, ``"sd3"``; ``"sd-unet"`` for an original-layout UNet alone), None when it
    is none of them; UnsupportedModel for a recognised single file jdistill does not read."""
    keys = list(keys)
    for marker, what in _REFUSED:
        if any(k.startswith(marker) or f".{marker}" in k or k == marker for k in keys):
            raise UnsupportedModel(f"{what} is not read from a single file by jdistill")
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(UNET + "joint_blocks.") or has("joint_blocks.") and has("context_embedder."):
        return "sd3"
    if not has(UNET + "input_blocks."):
        return None
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return "sd-unet"  # a UNet alone: its family is told from the cross-attention width when planned


def _unet_only_layout(shapes) -> str:
    width = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if width is None:
        raise UnsupportedModel("an original-layout UNet without cross-attention weights (attn2): not a text-to-image "
                               f"Stable Diffusion UNet, or a file cut short ({len(shapes)} UNet tensors)")
    by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
    if width not in by_width:
        raise UnsupportedModel(f"a UNet-only single file with cross-attention width {width}: not SD 1.x (768), "
                               "2.x (1024), SDXL (2048) or the SDXL refiner (1280); pass config= a pipeline folder")
    return by_width[width]


@dataclass
class Component:
    name: str
    family: str
    config: dict
    view: Callable[[Mapping], Mapping]  # the opened file -> the family's keys
    config_file: Path | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Found:
    components: list[Component]
    unused: list[str]
    index: dict
    index_file: Path | None = None
    copies: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layout: str = ""  # "sd-unet" resolved to the family its UNet belongs to


def _shapes_under(state: Mapping, prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: tuple(state.shape(k)) for k in state.keys() if k.startswith(prefix)}


def _prefix(state: Mapping, *candidates: str) -> str | None:
    return next((p for p in candidates if any(k.startswith(p) for k in state.keys())), None)


def _view(prefix: str, rules: Sequence, made: Mapping | None = None):
    return lambda state: RuledView(state, rules, prefix, made)


def _given(pipeline_config: Path | None, name: str) -> tuple[dict | None, Path | None]:
    if pipeline_config is None:
        return None, None
    file = pipeline_config / name / CONFIG_NAME
    return (read_json(file), file) if file.is_file() else (None, None)


def plan_components(state, layout: str, *, where: str, pipeline_config: Path | None = None,
                    components: Sequence[str] | None = None) -> Found:
    """Every component of a ``layout`` single file (``state``: the opened file, whose shapes are
    read from its header), each with its config and view; keys no component reads; the
    ``model_index.json`` to write. ``components`` selects what to convert (all by default)."""
    found: list[Component] = []
    notes: list[str] = []

    def add(name, family, config_from_shapes, rules_for, prefix, made=None, note=()):
        given, file = _given(pipeline_config, name)
        try:
            config = given if given is not None else config_from_shapes()
        except (KeyError, ValueError, StopIteration) as e:
            raise UnsupportedModel(f"{where}: the {name} of a {layout} single file does not read as one "
                                   f"({type(e).__name__}: {e})") from e
        found.append(Component(name, family, config, _view(prefix, rules_for(config), made), file, tuple(note)))

    if layout == "sd3":
        _sd3(state, add)
    else:
        layout = _sd(state, layout, add)
    unused = _unused(state, found)
    present = [c.name for c in found]
    if components:
        unknown = [c for c in components if c not in present]
        if unknown:
            raise InvalidArgument(f"{where}: no component {unknown} in this {layout} single file; it holds {present}")
        found = [c for c in found if c.name in components]
    index, index_file, copies, skipped = _index(layout, present, pipeline_config, components)
    if pipeline_config is None:
        notes.append("a single file holds no scheduler or tokenizer: pass config= a diffusers pipeline folder (or "
                     "use a preset) for text-to-image")
    return Found(found, unused, index, index_file, copies, skipped, notes, layout)


def _sd(state, layout, add) -> str:
    unet_shapes = _shapes_under(state, UNET)
    if layout not in _SD:
        layout = _unet_only_layout(unet_shapes)
    heads, sample, image, scaling = _SD[layout]
    te2_prefix = {"sdxl": "conditioner.embedders.1.model.", "sdxl-refiner": "conditioner.embedders.0.model."}.get(layout)
    pooled = None
    if te2_prefix is not None and any(k.startswith(te2_prefix) for k in state.keys()):
        pooled = state.shape(te2_prefix + "text_projection")[1]
    add("unet", "unet_cond",
        lambda: unet_cond.config_from_ldm(unet_shapes, heads=heads, sample_size=sample, pooled_dim=pooled,
                                          time_ids=5 if layout == "sdxl-refiner" else 6),
        unet_cond.ldm_rules, UNET)
    vae_prefix = _prefix(state, *VAE_PREFIXES)
    if vae_prefix is not None:
        shapes = _shapes_under(state, vae_prefix)
        add("vae", "vae", lambda: vae.config_from_ldm(shapes, sample_size=image, scaling_factor=scaling),
            vae.ldm_rules, vae_prefix)
    te1 = _prefix(state, "cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
    if te1 is not None:
        shapes = _hf_clip_shapes(state, te1)
        add("text_encoder", "clip", lambda: clip.config_from_shapes(shapes, hidden_act="quick_gelu", projection_dim=None),
            clip.export_rules, te1)
    if layout == "sd2" and _prefix(state, "cond_stage_model.model.") is not None:
        prefix = "cond_stage_model.model."
        shapes = _shapes_under(state, prefix)
        total = len({k.split(".")[2] for k in shapes if k.startswith("transformer.resblocks.")})
        # SD 2.x conditions on the penultimate layer: diffusers' text_encoder is saved without the last
        add("text_encoder", "clip", lambda: clip.openclip_config(shapes, num_layers=total - 1, projection=False),
            lambda c: clip.openclip_rules(c["num_hidden_layers"], projection=False), prefix,
            note=(f"OpenCLIP layer {total - 1} and the projection are not read: SD 2.x conditions on the "
                  "penultimate layer, as diffusers' text_encoder does",))
    if te2_prefix is not None and pooled is not None:
        shapes = _shapes_under(state, te2_prefix)
        add("text_encoder_2", "clip", lambda: clip.openclip_config(shapes, projection=True),
            lambda c: clip.openclip_rules(c["num_hidden_layers"], projection=True), te2_prefix)
    return layout


def _hf_clip_shapes(state, prefix) -> dict:
    """Shapes of a transformers-layout CLIP tower under ``prefix``, as ``text_model.*`` keys."""
    shapes = _shapes_under(state, prefix)
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in shapes.items()}


_SD3_OTHERS = r"^(first_stage_model|vae|text_encoders|model_ema)\."


def _sd3(state, add):
    # Stability's files put the MMDiT under model.diffusion_model.; some repacks keep it at the top
    prefix = UNET if any(k.startswith(UNET) for k in state.keys()) else ""
    shapes = {k: v for k, v in _shapes_under(state, prefix).items() if not re.match(_SD3_OTHERS, k)}
    add("transformer", "mmdit", lambda: mmdit.config_from_original(shapes),
        lambda c: [engine.drop(_SD3_OTHERS)] + mmdit.original_rules(c), prefix)
    vae_prefix = _prefix(state, *VAE_PREFIXES)
    if vae_prefix is not None:
        vae_shapes = _shapes_under(state, vae_prefix)
        add("vae", "vae", lambda: vae.config_from_ldm(vae_shapes, **_SD3_VAE), vae.ldm_rules, vae_prefix)
    for name, tower, act in (("text_encoder", "clip_l", "quick_gelu"), ("text_encoder_2", "clip_g", "gelu")):
        te = f"text_encoders.{tower}.transformer."
        if _prefix(state, te) is None:
            continue
        te_shapes = _hf_clip_shapes(state, te)
        width = te_shapes["text_model.embeddings.token_embedding.weight"][1]
        proj = te_shapes.get("text_projection.weight")
        made, note = None, ()
        if proj is None:
            # SD3's pipelines read the pooled CLIP-L output through a projection its single files do
            # not store; diffusers' from_single_file puts the identity there, and so does this
            made = {"text_projection.weight": ((width, width), lambda w=width: np.eye(w, dtype=np.float32))}
            note = ("text_projection: not in the file, the identity (as diffusers' from_single_file)",)
        add(name, "clip",
            lambda s=te_shapes, a=act, p=proj: clip.config_from_shapes(s, hidden_act=a,
                                                                         projection_dim=p[0] if p else width),
            clip.export_rules, te, made, note)
    t5_prefix = "text_encoders.t5xxl.transformer."
    if _prefix(state, t5_prefix) is not None:
        t5_shapes = _shapes_under(state, t5_prefix)
        # the prefix only: T5's converter unties shared / embed_tokens itself (both are in SD3's files)
        add("text_encoder_3", "t5", lambda: t5.config_from_shapes(t5_shapes), lambda c: [], t5_prefix)


def _unused(state, components: list[Component]) -> list[str]:
    """Keys of the file no component's view reads."""
    read: set[str] = set()
    for c in components:
        read.update(c.view(state).sources)
    return sorted(k for k in state.keys() if k not in read)


_LIBRARIES = {"unet": ["diffusers", "UNet2DConditionModel"], "transformer": ["diffusers", "SD3Transformer2DModel"],
              "vae": ["diffusers", "AutoencoderKL"]}


def _index(layout, present, pipeline_config, components):
    """(model_index.json, its file when copied, folders to copy, skipped) for the converted folder."""
    selected = components or present
    if pipeline_config is not None:
        from jdistill.convert.sources import open_pipeline

        config_pipe = open_pipeline(pipeline_config)
        skipped = {n: "not selected" for n in present if n not in selected}
        skipped.update({n: "not in the file" for n in config_pipe.models if n not in present})
        return config_pipe.index, pipeline_config / PIPELINE_INDEX, dict(config_pipe.folders), skipped
    index = {"_class_name": PIPELINES[layout], "_jdistill_single_file": layout}
    for name in present:
        if name in _LIBRARIES:
            index[name] = _LIBRARIES[name]
        else:
            index[name] = ["transformers", "T5EncoderModel" if name == "text_encoder_3" else (
                "CLIPTextModel" if layout in ("sd1", "sd2") else "CLIPTextModelWithProjection")]
    if layout == "sdxl-refiner":
        index.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    skipped = {n: "not selected" for n in present if n not in selected}
    return index, None, {}, skipped


__all__ = ["detect", "plan_components", "PIPELINES", "Component", "Found"]
