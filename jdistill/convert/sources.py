"""What a path is: the first step of a conversion (source -> plan -> convert -> cache).

A source is described from file metadata and JSON alone (configs, ``model_index.json``,
shard indexes); no tensor file is opened here, so a conversion cache hit reads no weights.
The kinds:

* :class:`ModelSource`: a diffusers / transformers model folder (``config.json`` +
  weights, see :func:`jdistill.convert.io.find_weights`), or a bare checkpoint file
  (``.safetensors``, ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``). A bare file's family and
  config are read off its keys and shapes when it is planned
  (:mod:`jdistill.convert.plan`), unless a config is given: a config dict or a model
  folder / ``config.json`` for a bare diffusers-layout state dict (e.g. SDXL-Lightning's
  ``*_unet.safetensors``), or a diffusers pipeline folder (or a preset naming one) for a
  single-file Stable Diffusion / SD3 checkpoint (its components' configs, scheduler and
  tokenizers are used, as ``from_single_file(config=...)`` uses them);
* :class:`PipelineSource`: a diffusers pipeline folder (``model_index.json``): each
  component is a model (config + weights), a folder copied as it is (scheduler,
  tokenizer, feature extractor), or absent / null.

:func:`resolve` turns a preset name into its local copy (:mod:`jdistill.convert.presets`)
so that every entry point accepts a path or a preset name alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from jdistill.errors import InvalidArgument, MissingInput
from jdistill.convert.io import (CONFIG_NAME, CONVERTED_MARKER, PIPELINE_INDEX, CheckpointReadError, LazyStateDict,
                                 _listing, _scan_weights, find_weights, open_state_dict, read_json)


@dataclass
class ModelSource:
    """One model: a folder with ``config.json`` and weights, or a bare checkpoint file
    (``config`` is then ``None`` unless given, and the plan reads it off the keys)."""

    path: Path  # the model folder, or the checkpoint file
    config: dict | None
    weights: Path  # the file or shard index to open
    variant: str | None = None
    wrapper: str | None = None
    config_file: Path | None = None  # where ``config`` was read from (None: given as a dict)
    pipeline_config: Path | None = None  # a diffusers pipeline folder describing a single-file checkpoint

    def open(self) -> LazyStateDict:
        return open_state_dict(self.weights, wrapper=self.wrapper)

    @property
    def is_file(self) -> bool:
        """A bare checkpoint file (not a model folder)."""
        return self.path == self.weights and self.path.is_file()

    def files(self) -> list[Path]:
        """Every file this model is read from (config, index, shards, a config folder's JSON),
        for cache keys."""
        out = [self.config_file] if self.config_file is not None else []
        out.append(self.weights)
        if self.weights.name.endswith(".json"):
            try:
                shards = sorted(set(json.loads(self.weights.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError):
                shards = []  # open() will say what is wrong with it
            out += [self.weights.parent / s for s in shards]
        if self.pipeline_config is not None:
            out += sorted(p for p in self.pipeline_config.rglob("*") if p.is_file())
        return out

    @property
    def class_name(self) -> str | None:
        if self.config is None:
            return None
        archs = self.config.get("architectures") or [None]
        return self.config.get("_class_name") or archs[0] or self.config.get("model_type")


@dataclass
class PipelineSource:
    """A diffusers pipeline folder (``model_index.json``)."""

    path: Path
    index: dict
    models: dict[str, ModelSource] = field(default_factory=dict)  # components with config + weights
    folders: dict[str, Path] = field(default_factory=dict)  # components without weights: copied as they are
    absent: dict[str, str] = field(default_factory=dict)  # named in model_index, not here: name -> why

    @property
    def class_name(self) -> str | None:
        return self.index.get("_class_name")

    def component_classes(self) -> dict[str, str | None]:
        return {k: v[1] for k, v in self.index.items() if is_component(v)}

    def files(self, components=None) -> list[Path]:
        """model_index.json, the selected models' files and every file of the copied folders."""
        out = [self.path / PIPELINE_INDEX]
        for name, ms in self.models.items():
            if components is None or name in components:
                out += ms.files()
        for folder in self.folders.values():
            out += sorted(p for p in folder.rglob("*") if p.is_file())
        return out


def is_component(value) -> bool:
    """A ``model_index.json`` entry naming a component: ``[library, class]`` (either may be null)."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def _given_config(config) -> tuple[dict | None, Path | None, Path | None]:
    """(config dict, its file, a pipeline folder) from what a caller passed as ``config``: a dict, a
    config.json or a model folder, a pipeline folder, or a preset name (its local copy)."""
    if config is None:
        return None, None, None
    if isinstance(config, Mapping):
        return dict(config), None, None
    path = Path(config).expanduser()
    if not path.exists():
        from jdistill.convert import presets

        named = presets.find(str(config))
        if named is not None:  # a preset's local copy, checked to be it, describes the file (config="sdxl")
            path = presets.locate(named)
            problems = [] if named.is_file or named.folder == "model" else presets.folder_mismatches(named, path)
            if problems:
                raise presets.PresetMismatch(presets._mismatch_message(named, path, problems))
    if path.is_dir() and (path / PIPELINE_INDEX).is_file():
        return None, None, path
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise MissingInput(f"config {path}: neither a config.json, a model folder with one, nor a diffusers "
                                "pipeline folder (model_index.json)")
    return read_json(file), file, None


def open_model(path, *, variant: str | None = None, wrapper: str | None = None, config=None) -> ModelSource:
    """A model folder (``config.json`` + weights) or a bare checkpoint file; ``config`` (a dict,
    a config.json / model folder, or a pipeline folder) describes a bare file."""
    path = Path(path)
    if path.is_file():
        cfg, cfg_file, pipe = _given_config(config)
        return ModelSource(path=path, config=cfg, weights=path, wrapper=wrapper, config_file=cfg_file,
                           pipeline_config=pipe)
    if config is not None:
        raise InvalidArgument(f"{path} is a model folder: its own config.json describes it (config= is for bare files)")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointReadError(f"{path}: not a model folder (no {CONFIG_NAME}); it holds {_listing(path)}")
    return ModelSource(path=path, config=read_json(config_path), weights=find_weights(path, variant),
                       variant=variant, wrapper=wrapper, config_file=config_path)


def open_pipeline(path, *, variant: str | None = None) -> PipelineSource:
    """A pipeline folder: each ``model_index.json`` component sorted into models (config +
    weights), folders to copy (schedulers, tokenizers, processors) and absent ones (``null``
    entries, or subfolders not there: a partial download)."""
    path = Path(path)
    index = read_json(path / PIPELINE_INDEX)
    src = PipelineSource(path=path, index=index)
    for name, value in index.items():
        if not is_component(value):
            continue  # a pipeline setting (requires_safety_checker, id2label, ...)
        sub = path / name
        if value[1] is None:
            src.absent[name] = "null in model_index.json"
        elif not sub.is_dir():
            src.absent[name] = f"no {name}/ folder"
        elif (sub / CONFIG_NAME).is_file() and (found := _scan_weights(sub)):
            # a pipeline's variant applies to the components saved in it (public repos hold fp16
            # variants of the big models only); the others are read in their default form
            has_variant = any(v == variant for v, _ in found)
            src.models[name] = open_model(sub, variant=variant if has_variant else None)
        else:
            src.folders[name] = sub
    return src


def open_source(path, *, variant: str | None = None, wrapper: str | None = None,
                config=None) -> ModelSource | PipelineSource:
    """What ``path`` is: a pipeline folder, a model folder, or a bare checkpoint file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInput(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / CONVERTED_MARKER).is_file():
            raise CheckpointReadError(f"{path}: already a converted jdistill folder; load it with load_pretrained")
        if (path / PIPELINE_INDEX).is_file():
            if config is not None:
                raise InvalidArgument(f"{path} is a pipeline folder: its own configs describe it (config= is for bare "
                                 "files)")
            return open_pipeline(path, variant=variant)
    return open_model(path, variant=variant, wrapper=wrapper, config=config)


def resolve(src, models_dir=None):
    """``(path, preset)``: ``src`` itself when it exists (preset None), else the local copy of the
    preset it names (:func:`jdistill.convert.presets.resolve`, which only locates it: the values
    are checked against the plan, which reads each config once)."""
    from jdistill.convert import presets

    path = Path(src).expanduser()
    if path.exists():
        return path, None
    preset = presets.find(str(src))
    if preset is None:
        raise MissingInput(f"{src}: no such file or folder, and not a preset name "
                                f"(presets: {', '.join(presets.PRESETS)})")
    return presets.locate(preset, models_dir=models_dir), preset


__all__ = ["ModelSource", "PipelineSource", "open_model", "open_pipeline", "open_source", "resolve", "is_component"]
