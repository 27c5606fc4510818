"""Names for the public checkpoints jdistill distils, resolved to local copies only.

A preset records where the checkpoint is published (hub id, or URL for the original
DiT files), the component classes its ``model_index.json`` names, and the config
values that identify it (sample sizes, cross-attention widths, the scheduler's
prediction type, ...), as published in the public configs. :func:`resolve` finds a
local copy and checks it against those values; nothing is downloaded. Where it looks,
in order:

1. ``models_dir`` (an argument), then each folder of ``$JDISTILL_MODELS`` (``os.pathsep``
   separated): ``<dir>/<preset name>``, ``<dir>/<org>--<repo>``, ``<dir>/<org>/<repo>``,
   ``<dir>/<repo>`` and the Hugging Face cache layout ``<dir>/models--<org>--<repo>``;
   for a single-file preset ``<dir>/<file>`` and ``<dir>/<preset name>/<file>``;
2. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``): ``models--<org>--<repo>/snapshots/<revision>``, the
   revision ``refs/main`` names first, then the newest.

Values marked in :data:`ABSENT_MEANS` are checked against the library default when
a config omits them (SD 1.5's scheduler config predates ``prediction_type``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from jdistill.convert import io

# The configs key of model_index.json in check(); the key of a single model's config is SINGLE.
INDEX = "model_index.json"
SINGLE = "model"

# A key a config may omit, and what diffusers then uses.
ABSENT_MEANS = {"prediction_type": "epsilon", "scaling_factor": 0.18215}


class PresetNotFound(FileNotFoundError):
    """No local copy of a preset; the message lists every place looked at and how to provide one."""


class PresetMismatch(ValueError):
    """A local folder found for a preset that is not that checkpoint (names every differing value)."""


@dataclass(frozen=True)
class Preset:
    name: str
    repo_id: str  # the Hugging Face hub id (the diffusers folder), or "" for a file published elsewhere
    description: str
    pipeline: tuple[str, ...] = ()  # accepted model_index.json _class_name; empty for a single file
    components: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> accepted classes
    expect: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # component ("" = the file) -> values
    default_component: str | None = None  # what load_pretrained(preset) returns without component=
    filename: str | None = None  # single-file presets: the file's published name
    url: str | None = None
    mirrors: tuple[str, ...] = ()  # other hub ids publishing the same files

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    @property
    def file_config(self) -> Mapping | None:
        """The published config that describes a bare file of this preset (None: the file
        describes itself, or the preset is a folder)."""
        return None

    def hub_ids(self) -> tuple[str, ...]:
        return tuple(r for r in (self.repo_id, *self.mirrors) if r)

    def where_published(self) -> str:
        return self.url or f"https://huggingface.co/{self.repo_id}"


_SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012}
_DIT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
_DIT_TRANSFORMER = {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2,
                    "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero"}
_DIT_ORIGINAL = {"patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28, "num_heads": 16,
                 "num_classes": 1000, "learn_sigma": True}
_SD_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
               "tokenizer": ("CLIPTokenizer",)}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "sd15", "runwayml/stable-diffusion-v1-5", "Stable Diffusion 1.5 (512 px, epsilon prediction)",
        pipeline=("StableDiffusionPipeline",), components=_SD_CLASSES, default_component="unet",
        # runwayml's repo was withdrawn in 2024; the same files live on under this id
        mirrors=("stable-diffusion-v1-5/stable-diffusion-v1-5",),
        expect={
            "unet": {"sample_size": 64, "in_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8,
                     "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2},
            "vae": {"latent_channels": 4, "scaling_factor": 0.18215},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon"},
        }),
    Preset(
        "sd21", "stabilityai/stable-diffusion-2-1", "Stable Diffusion 2.1 (768 px, v-prediction)",
        pipeline=("StableDiffusionPipeline",), components=_SD_CLASSES, default_component="unet",
        expect={
            "unet": {"sample_size": 96, "in_channels": 4, "cross_attention_dim": 1024,
                     "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                     "block_out_channels": [320, 640, 1280, 1280]},
            "vae": {"latent_channels": 4, "scaling_factor": 0.18215},
            "text_encoder": {"hidden_size": 1024, "num_hidden_layers": 23},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        }),
    Preset(
        "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "Stable Diffusion XL base 1.0 (1024 px, epsilon)",
        pipeline=("StableDiffusionXLPipeline",), default_component="unet",
        components={**_SD_CLASSES, "text_encoder_2": ("CLIPTextModelWithProjection",),
                    "tokenizer_2": ("CLIPTokenizer",)},
        expect={
            "unet": {"sample_size": 128, "in_channels": 4, "cross_attention_dim": 2048,
                     "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
                     "attention_head_dim": [5, 10, 20], "addition_embed_type": "text_time",
                     "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
            "vae": {"latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12},
            "text_encoder_2": {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon", "timestep_spacing": "leading",
                          "steps_offset": 1},
        }),
    Preset(
        "sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers",
        "Stable Diffusion 3 Medium (MMDiT, rectified flow, 1024 px)",
        pipeline=("StableDiffusion3Pipeline",), default_component="transformer",
        components={"transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
                    "text_encoder": ("CLIPTextModelWithProjection",),
                    "text_encoder_2": ("CLIPTextModelWithProjection",), "text_encoder_3": ("T5EncoderModel",),
                    "scheduler": ("FlowMatchEulerDiscreteScheduler",)},
        expect={
            "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                            "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64,
                            "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                            "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
            "vae": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            "text_encoder": {"hidden_size": 768, "projection_dim": 768},
            "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280},
            "text_encoder_3": {"d_model": 4096, "num_layers": 24},
            "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
        }),
    Preset(
        "dit-xl-2-256", "facebook/DiT-XL-2-256", "DiT-XL/2, ImageNet 256 px (diffusers)",
        pipeline=("DiTPipeline",), default_component="transformer",
        components={"transformer": ("Transformer2DModel", "DiTTransformer2DModel"), "vae": ("AutoencoderKL",)},
        expect={"transformer": {**_DIT_TRANSFORMER, "sample_size": 32}, "vae": {"latent_channels": 4},
                "scheduler": _DIT_SCHEDULER}),
    Preset(
        "dit-xl-2-512", "facebook/DiT-XL-2-512", "DiT-XL/2, ImageNet 512 px (diffusers)",
        pipeline=("DiTPipeline",), default_component="transformer",
        components={"transformer": ("Transformer2DModel", "DiTTransformer2DModel"), "vae": ("AutoencoderKL",)},
        expect={"transformer": {**_DIT_TRANSFORMER, "sample_size": 64}, "vae": {"latent_channels": 4},
                "scheduler": _DIT_SCHEDULER}),
    Preset(
        "dit-xl-2-256-original", "", "DiT-XL/2, ImageNet 256 px (the original facebookresearch EMA weights)",
        filename="DiT-XL-2-256x256.pt", url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
        expect={"": {**_DIT_ORIGINAL, "input_size": 32}}),
    Preset(
        "dit-xl-2-512-original", "", "DiT-XL/2, ImageNet 512 px (the original facebookresearch EMA weights)",
        filename="DiT-XL-2-512x512.pt", url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
        expect={"": {**_DIT_ORIGINAL, "input_size": 64}}),
    Preset(
        "bk-sdm-tiny", "nota-ai/bk-sdm-tiny", "BK-SDM-Tiny: SD 1.4 with a block-removed, distilled UNet (512 px)",
        pipeline=("StableDiffusionPipeline",), components=_SD_CLASSES, default_component="unet",
        expect={
            "unet": {"sample_size": 64, "in_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8,
                     "block_out_channels": [320, 640, 1280], "layers_per_block": 1, "mid_block_type": None,
                     "down_block_types": ["CrossAttnDownBlock2D"] * 3,
                     "up_block_types": ["CrossAttnUpBlock2D"] * 3},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12},
            "scheduler": {**_SD_SCHEDULER, "prediction_type": "epsilon"},
        }),
)}

ALIASES = {"sd1.5": "sd15", "sd-1.5": "sd15", "sd2.1": "sd21", "sd-2.1": "sd21", "sdxl-base": "sdxl",
           "sd3": "sd3-medium", "dit-xl/2-256": "dit-xl-2-256", "dit-xl/2-512": "dit-xl-2-512"}


def find(name: str) -> Preset | None:
    """The preset called ``name`` (or an alias, or its hub id), else None."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    return next((p for p in PRESETS.values() if str(name) in p.hub_ids()), None)


def get(name: str) -> Preset:
    preset = find(name)
    if preset is None:
        raise KeyError(f"no preset {name!r}; known: {', '.join(PRESETS)}")
    return preset


# ---------------------------------------------------------------- finding a local copy


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _snapshots(repo_dir: Path) -> list[Path]:
    """A hub-cache repo folder's snapshots: the one refs/main names, then the newest first."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return [snaps]  # listed so the message shows it was looked at
    out = []
    main = repo_dir / "refs" / "main"
    if main.is_file():
        out.append(snaps / main.read_text().strip())
    out += sorted((p for p in snaps.iterdir() if p.is_dir() and p not in out), key=lambda p: -p.stat().st_mtime)
    return out


def candidates(preset: Preset, models_dir=None, hub_cache=None) -> list[Path]:
    """Every place :func:`resolve` looks, in order."""
    roots = [Path(models_dir).expanduser()] if models_dir else []
    roots += [Path(p).expanduser() for p in os.environ.get("JDISTILL_MODELS", "").split(os.pathsep) if p]
    out: list[Path] = []
    for root in roots:
        if preset.is_file:
            out += [root / preset.filename, root / preset.name / preset.filename]
            continue
        out.append(root / preset.name)
        for repo in preset.hub_ids():
            org, _, base = repo.partition("/")
            out += [root / f"{org}--{base}", root / org / base, root / base]
            out += _snapshots(root / f"models--{org}--{base}")
    if not preset.is_file:
        cache = Path(hub_cache).expanduser() if hub_cache else hub_cache_dir()
        for repo in preset.hub_ids():
            out += _snapshots(cache / f"models--{repo.replace('/', '--')}")
    return list(dict.fromkeys(out))


def locate(preset: Preset | str, models_dir=None, hub_cache=None) -> Path:
    """The local copy of ``preset``; no network, nothing read but directory entries. Raises
    :class:`PresetNotFound` naming every place looked at and how to provide the copy."""
    preset = get(preset) if isinstance(preset, str) else preset
    looked = candidates(preset, models_dir, hub_cache)
    for path in looked:
        if path.is_file() if preset.is_file else (path / io.PIPELINE_INDEX).is_file():
            return path
    raise PresetNotFound(_not_found_message(preset, looked))


def resolve(preset: Preset | str, models_dir=None, hub_cache=None, check: bool = True) -> Path:
    """The local copy of ``preset`` (:func:`locate`), checked against its published values
    (:func:`mismatches`) unless ``check`` is False. Raises :class:`PresetNotFound` or
    :class:`PresetMismatch`. (Loading a preset checks the same values against the plan it
    makes anyway, without this second look.)"""
    preset = get(preset) if isinstance(preset, str) else preset
    path = locate(preset, models_dir, hub_cache)
    if check:
        problems = mismatches(preset, path)
        if problems:
            raise PresetMismatch(_mismatch_message(preset, path, problems))
    return path


def _not_found_message(preset: Preset, looked: list[Path]) -> str:
    lines = [f"preset {preset.name!r} ({preset.description}; {preset.where_published()}) has no local copy. "
             "Looked in:"]
    lines += [f"  {p}" for p in looked]
    if not os.environ.get("JDISTILL_MODELS"):
        lines.append("  ($JDISTILL_MODELS is not set: no models folder was searched)")
    if preset.is_file:
        how = (f"download {preset.url} where there is network, put it at $JDISTILL_MODELS/{preset.filename}, "
               "or pass the file's path instead of the preset name")
    else:
        how = (f"download it where there is network (`huggingface-cli download {preset.repo_id} --local-dir "
               f"$JDISTILL_MODELS/{preset.name}`, or into the Hugging Face cache), copy it here and set "
               "JDISTILL_MODELS (or HF_HOME / HF_HUB_CACHE), or pass the folder's path instead of the preset name")
    lines.append(f"jdistill never downloads: {how}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- checking a copy


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_values(config: Mapping, expect: Mapping, where: str) -> list[str]:
    problems = []
    for key, want in expect.items():
        if key in config:
            have = config[key]
        elif key in ABSENT_MEANS:
            have = ABSENT_MEANS[key]
        else:
            problems.append(f"{where}: {key} absent, expected {want!r}")
            continue
        if not _same(have, want):
            problems.append(f"{where}: {key} is {have!r}, expected {want!r}")
    return problems


def check(preset: Preset, configs: Mapping[str, Mapping]) -> list[str]:
    """What in ``configs`` (component -> config dict, with ``"scheduler"`` and :data:`INDEX` for
    model_index.json where known) differs from the preset; empty when it is the checkpoint.
    Components whose config is not there (a partial download, a component not converted) are
    not checked here; converting one of them fails on its own."""
    problems = []
    index = configs.get(INDEX)
    if index is not None and not preset.is_file:
        if preset.pipeline and index.get("_class_name") not in preset.pipeline:
            problems.append(f"model_index.json: _class_name is {index.get('_class_name')!r}, expected "
                            f"{' or '.join(preset.pipeline)}")
        for name, accepted in preset.components.items():
            entry = index.get(name)
            cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            if cls not in accepted:
                problems.append(f"model_index.json: {name} is {cls!r}, expected {' or '.join(accepted)}")
    for name, expect in preset.expect.items():
        config = configs.get(name or SINGLE)
        if config is not None:
            where = ("scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json") if name \
                else "the file"
            problems += check_values(config, expect, where)
    return problems


def ensure(preset: Preset, configs: Mapping[str, Mapping], where) -> None:
    """:class:`PresetMismatch` unless :func:`check` finds nothing."""
    problems = check(preset, configs)
    if problems:
        raise PresetMismatch(_mismatch_message(preset, where, problems))


def _mismatch_message(preset: Preset, path, problems: list[str]) -> str:
    return (f"{path} was found for preset {preset.name!r} ({preset.description}) but is not that checkpoint:\n  "
            + "\n  ".join(problems) + "\n(to use this folder anyway, pass its path instead of the preset name)")


def mismatches(preset: Preset, path: Path) -> list[str]:
    """What in the local copy ``path`` differs from the preset (empty when it is the checkpoint).
    A folder's configs are read as JSON (weights need not be there); a bare file is planned as
    a conversion would plan it (its header is read)."""
    path = Path(path)
    if preset.is_file:
        from jdistill.convert import pretrained, sources
        from jdistill.convert.plan import plan

        with plan(sources.open_source(path, config=preset.file_config)) as work:
            return check(preset, pretrained._configs(work))
    configs = {INDEX: io.read_json(path / io.PIPELINE_INDEX)}
    for name in preset.expect:
        sub = path / name
        file = next((sub / f for f in ("config.json", "scheduler_config.json") if (sub / f).is_file()), None)
        if file is not None:
            configs[name] = io.read_json(file)
    return check(preset, configs)
