"""PyTorch checkpoints -> self-describing jdistill folders (Orbax params + configs), and back.

The load API, on top of the conversion steps source (:mod:`~jdistill.convert.sources`) ->
plan (:mod:`~jdistill.convert.plan`) -> convert (here, with the family converters) ->
cache (:mod:`~jdistill.convert.cache`). :func:`convert` reads a model folder, a pipeline
folder, a bare checkpoint file (a single-file Stable Diffusion / SD3 checkpoint, an
original DiT ``.pt``, a diffusers-layout state dict with a given config) or a preset's
local copy, converts each model with its family's converter and writes::

    DST/jdistill.json            the manifest, written last: what was converted, from where, how
    DST/model_index.json         pipelines and single-file checkpoints
    DST/<component>/config.json  the source config (read off the shapes for a bare file)
    DST/<component>/params/      Orbax PyTree checkpoint of the param tree
    DST/scheduler/, tokenizer*/  copied as they are

(a single model writes ``config.json`` and ``params/`` at the top, component ``"model"``).
The folder is staged under a temporary name (:mod:`~jdistill.convert.staging`) and renamed
into place complete, so a folder without its manifest is never taken for a converted one.

:func:`load_pretrained` restores a converted folder, or converts a source on first use
into the cache and restores it from there afterwards without reading the PyTorch weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jdistill
from jdistill.errors import InvalidArgument, OutputExists
from jdistill.convert import cache, engine, io, presets, registry, sources
from jdistill.convert.dtypes import DTYPES, dtype_name
from jdistill.convert.cache import FORMAT_VERSION, default_cache_dir
from jdistill.convert.engine import ConversionError
from jdistill.convert.params_io import restore_params, save_params
from jdistill.convert.plan import SINGLE, Job, Plan, _grouped, plan
from jdistill.convert.staging import staging

FORMAT = "jdistill-converted"
MANIFEST = io.CONVERTED_MARKER
PARAMS = "params"

# ---------------------------------------------------------------- results


@dataclass
class ComponentReport:
    name: str
    family: str
    class_name: str
    tensors: int
    bytes: int
    seconds: float
    source: str
    entry: str = ""  # the entry of a torch training checkpoint the weights came from ("ema", ...)
    notes: tuple[str, ...] = ()


@dataclass
class ConvertReport:
    source: str
    destination: str
    kind: str  # "model", "pipeline", "file" or "single-file"
    dtype: str
    components: list[ComponentReport] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    layout: str | None = None  # a single file's layout ("sd1", "sdxl", "sd3", ...)
    unused: list[str] = field(default_factory=list)  # keys of a single file no component reads
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = sum(c.bytes for c in self.components)
        kind = f"{self.kind}, {self.layout}" if self.layout else self.kind
        lines = [f"converted {self.source} ({kind}) -> {self.destination}: {len(self.components)} model(s), "
                 f"{_bytes(total)} as {self.dtype}, {self.seconds:.1f} s"]
        for c in self.components:
            lines.append(f"  {c.name:<16} {c.family:<10} {c.class_name:<30} {c.tensors:>6} tensors "
                         f"{_bytes(c.bytes):>10} {c.seconds:6.1f} s" + (f"  (weights: '{c.entry}')" if c.entry else ""))
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        if self.unused:
            lines.append(f"  {len(self.unused)} keys of the file no component reads: {_grouped(self.unused)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


@dataclass
class Pretrained:
    """A restored model. Unpacks as ``module, params = load_pretrained(...)``."""

    module: Any
    params: Any
    config: dict
    family: str
    component: str
    path: Path  # the converted folder (a cache entry when converted on the fly)

    def __iter__(self) -> Iterator:
        return iter((self.module, self.params))



# ---------------------------------------------------------------- converting


def _open(src, *, variant, wrapper, config, models_dir):
    """(source, preset): a path or preset name described (sources.resolve / open_source); a
    preset's published config describes a bare file of its own."""
    if isinstance(src, (sources.ModelSource, sources.PipelineSource)):
        return src, None
    named = None if Path(src).expanduser().exists() else presets.find(str(src))
    if named is not None and named.lora:  # said before looking for a copy: there is nothing to convert
        raise InvalidArgument(f"preset {named.name!r} is a LoRA for {named.base!r}, not a model to convert: load it with "
                         f"load_pretrained({named.name!r}) ({named.base}'s {named.default_component} with the LoRA "
                         f"merged) or TextToImage.from_pretrained({named.name!r})")
    path, preset = sources.resolve(src, models_dir)
    if config is None and preset is not None:
        config = preset.file_config
    return sources.open_source(path, variant=variant, wrapper=wrapper, config=config), preset


def _convert_job(work: Plan, job: Job, out: Path, dtype: str) -> ComponentReport:
    t0 = time.perf_counter()
    conv = job.family.load()
    jdt = DTYPES[dtype]
    where = os.fspath(job.source.weights) + (f" ({job.name})" if work.kind == "single-file" else "")
    try:
        module = conv.module_from_config(job.config, dtype=jdt, param_dtype=jdt)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{job.source.path}: its config does not describe a {job.family.name} model: {e}") from e
    with work.tensors(job) as sd:
        entry = getattr(sd, "unwrapped", "") or (work.state.unwrapped if work.state is not None else "")
        try:
            params = conv.load_params(sd, module)
        except ConversionError as e:
            raise type(e)(f"{where}" + (f" [{entry}]" if entry else "") + f": {e}") from e
    leaves = jax.tree.leaves(params)
    tensors, nbytes = len(leaves), sum(int(np.asarray(x).nbytes) for x in leaves)
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / PARAMS, params)
    del params, leaves  # the tree is the conversion's one copy of the weights: free it before the next
    if job.config_file is not None:  # the source's own file, byte for byte
        shutil.copyfile(job.config_file, out / io.CONFIG_NAME)
    else:  # read off a bare file's keys, or given
        _write_json(out / io.CONFIG_NAME, job.config)
    return ComponentReport(job.name, job.family.name, job.class_name, tensors, nbytes, time.perf_counter() - t0,
                           where, entry, job.notes)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _write(work: Plan, dst: Path, dtype: str, overwrite: bool, t0: float) -> ConvertReport:
    source = work.source
    report = ConvertReport(os.fspath(source.path), os.fspath(dst), work.kind, dtype, skipped=dict(work.skipped),
                           layout=work.layout, unused=list(work.unused), notes=list(work.notes))
    with staging(dst, overwrite) as tmp:
        for job in work.jobs:
            report.components.append(_convert_job(work, job, tmp / job.rel, dtype))
        if work.index is not None:
            if work.index_file is not None:
                shutil.copyfile(work.index_file, tmp / io.PIPELINE_INDEX)
            else:
                _write_json(tmp / io.PIPELINE_INDEX, work.index)
        for name, folder in work.copies.items():
            shutil.copytree(folder, tmp / name)
            report.copied.append(name)
        report.seconds = time.perf_counter() - t0
        _write_json(tmp / MANIFEST, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "jdistill_version": jdistill.__version__,
            "kind": work.kind, "source": os.fspath(source.path), "dtype": dtype, "layout": work.layout,
            "components": {c.name: {"path": j.rel, "family": c.family, "class_name": c.class_name,
                                    "tensors": c.tensors, "bytes": c.bytes, "source": c.source,
                                    "checkpoint_entry": c.entry, "notes": list(c.notes)}
                           for c, j in zip(report.components, work.jobs)},
            "copied": report.copied, "skipped": report.skipped, "unused_keys": report.unused,
            "notes": report.notes,
        })
    return report


def convert(src, dst, *, dtype="float32", components: Sequence[str] | None = None, variant: str | None = None,
            wrapper: str | None = None, overwrite: bool = False, models_dir=None, config=None) -> ConvertReport:
    """Convert ``src`` (a model / pipeline folder, a checkpoint file, or a preset name) into the
    jdistill folder ``dst``: every model component (or ``components``), params stored as
    ``dtype``; configs, ``model_index.json``, scheduler and tokenizer folders copied.

    ``config`` describes a bare file: a config dict / config.json / model folder (a
    diffusers-layout state dict), or a diffusers pipeline folder (a single-file checkpoint:
    its components' configs, scheduler and tokenizers are used instead of those read off the
    shapes). Every component's family is checked before any weight is converted; an
    unsupported one is an error naming it (convert the rest with ``components``). ``dst``
    appears only complete.
    """
    t0 = time.perf_counter()
    dtype = dtype_name(dtype)
    source, preset = _open(src, variant=variant, wrapper=wrapper, config=config, models_dir=models_dir)
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite:
        raise OutputExists(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    with plan(source, components) as work:
        if preset is not None:
            presets.ensure(preset, _configs(work), where=os.fspath(source.path))
        return _write(work, dst, dtype, overwrite, t0)


def _configs(work: Plan) -> dict:
    """Every config a preset may check, as the plan has them (no weights read): the jobs' and, of
    a pipeline, every model component's, its scheduler's and model_index.json."""
    out = dict(work.configs())
    if isinstance(work.source, sources.PipelineSource):
        out.update({name: ms.config for name, ms in work.source.models.items()})
    if work.index is not None:
        out[presets.INDEX] = work.index
    scheduler = work.copies.get("scheduler")
    if scheduler is not None and (scheduler / "scheduler_config.json").is_file():
        out["scheduler"] = io.read_json(scheduler / "scheduler_config.json")
    return out


# ---------------------------------------------------------------- restoring


def read_manifest(path) -> dict:
    """The manifest of a converted folder; a clear error for anything else (a folder cut short
    has none: the manifest is the last file written, and the folder is renamed in after it)."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ConversionError(f"{path} is not a complete jdistill folder: no {MANIFEST} (a conversion that did not "
                              "finish, or not a converted folder); convert the source again")
    manifest = io.read_json(file)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("components"), dict):
        raise ConversionError(f"{file}: not a jdistill manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ConversionError(f"{path} was written by a newer jdistill (format {manifest['format_version']}, this "
                              f"one reads {FORMAT_VERSION})")
    for name, entry in manifest["components"].items():
        if not (path / entry["path"] / PARAMS).is_dir():
            raise ConversionError(f"{path}: component {name} has no {entry['path']}/{PARAMS}")
    return manifest


def is_converted(path) -> bool:
    try:
        read_manifest(path)
    except (ConversionError, io.CheckpointReadError, OSError):
        return False
    return True


def converted_configs(path, manifest: dict | None = None) -> dict:
    """The configs of a converted folder by component (and its scheduler / model_index.json)."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    out = {name: io.read_json(path / e["path"] / io.CONFIG_NAME) for name, e in manifest["components"].items()}
    for name, file in ((presets.INDEX, path / io.PIPELINE_INDEX), ("scheduler", path / "scheduler" /
                                                                  "scheduler_config.json")):
        if file.is_file():
            out[name] = io.read_json(file)
    return out


def _pick(names: Sequence[str], component: str | None, where) -> str:
    if component is None:
        if len(names) == 1:
            return names[0]
        raise InvalidArgument(f"{where} holds {len(names)} models {sorted(names)}: pass component=")
    if component not in names:
        raise InvalidArgument(f"{where} has no component {component!r}; it holds {sorted(names)}")
    return component


def load_converted(path, component: str | None = None, dtype=None) -> Pretrained:
    """Restore one model of a converted folder: the module built from its config, params cast
    to ``dtype`` (default: as stored) and placed on the default device."""
    path = Path(path).expanduser().absolute()
    manifest = read_manifest(path)
    name = _pick(list(manifest["components"]), component, path)
    entry = manifest["components"][name]
    folder = path / entry["path"]
    config = io.read_json(folder / io.CONFIG_NAME)
    family = registry.get(entry["family"])
    conv = family.load(what=f"{folder} ({entry.get('class_name') or family.description})")
    dt = DTYPES[dtype_name(dtype or manifest["dtype"])]
    module = conv.module_from_config(config, dtype=dt, param_dtype=dt)
    args, kwargs = conv.example_inputs(module)
    abstract = engine.abstract_params(module, *args, **kwargs)
    params = restore_params(folder / PARAMS, abstract, what=f"{name} params")
    return Pretrained(module, params, config, family.name, name, path)


# ---------------------------------------------------------------- converting on first use


def convert_cached(src, component: str | None = None, dtype="float32", cache_dir=None, *, variant=None,
                   wrapper=None, models_dir=None, config=None) -> tuple[Path, str | None]:
    """The cache entry holding ``src`` converted (converting it if there is none yet) and the
    component to load from it. Only the requested component of a pipeline or single file is
    converted."""
    dtype = dtype_name(dtype)
    source, preset = _open(src, variant=variant, wrapper=wrapper, config=config, models_dir=models_dir)
    if preset is not None and component is None:
        component = preset.default_component
    if isinstance(source, sources.PipelineSource):
        component = _pick(sorted(source.models), component, source.path)
        components = [component]
    elif component in (None, SINGLE) or (preset is not None and component == preset.default_component
                                         and source.config is not None):
        # one model (a model folder, or a file its preset's config describes): the preset's component is it
        components, component = None, None
    else:  # a component of a single-file checkpoint (a single model's file says so when planned)
        components = [component]
    entry = cache.entry(source, dtype, components, variant, wrapper, name=preset.name if preset else None,
                        cache_dir=cache_dir)
    if is_converted(entry):
        if preset is not None:
            presets.ensure(preset, _hit_configs(source, entry), where=os.fspath(source.path))
        return entry, component
    if entry.exists():  # under the final name but incomplete: never ours (we rename in complete folders)
        shutil.rmtree(entry)
    t0 = time.perf_counter()
    with plan(source, components) as work:
        if components is None and len(work.jobs) > 1:
            raise InvalidArgument(f"{source.path} holds {len(work.jobs)} models {[j.name for j in work.jobs]} "
                             f"({work.layout or work.kind}): pass component=")
        if preset is not None:
            presets.ensure(preset, _configs(work), where=os.fspath(source.path))
        try:
            _write(work, entry, dtype, False, t0)
        except FileExistsError:
            if not is_converted(entry):  # someone else's complete copy is fine; anything else is not
                raise
    return entry, component


def _hit_configs(source, entry: Path) -> dict:
    """What a preset is checked against on a cache hit, read once: the configs the source
    description already holds, its scheduler's, and a bare file's config as it was read off
    the file when converted (the file itself is not opened)."""
    if isinstance(source, sources.PipelineSource):
        out = {presets.INDEX: source.index, **{n: ms.config for n, ms in source.models.items()}}
        scheduler = source.folders.get("scheduler")
        if scheduler is not None and (scheduler / "scheduler_config.json").is_file():
            out["scheduler"] = io.read_json(scheduler / "scheduler_config.json")
        return out
    if source.config is not None:
        return {SINGLE: source.config}
    return converted_configs(entry)


def load_pretrained(path_or_preset, component: str | None = None, dtype=None, cache_dir=None, *,
                    variant: str | None = None, wrapper: str | None = None, models_dir=None,
                    config=None) -> Pretrained:
    """A model ready to apply: ``module, params = load_pretrained(...)`` (a :class:`Pretrained`,
    which also carries ``config`` and ``family``).

    ``path_or_preset``: a converted jdistill folder (restored as it is), a PyTorch source
    (model folder, pipeline folder, checkpoint file: converted once into ``cache_dir`` and
    restored from there afterwards), or a preset name (its local copy, see
    :mod:`jdistill.convert.presets`; its default component, e.g. the UNet, unless
    ``component``). ``dtype`` is the params' dtype and the module's compute dtype (default:
    as stored; float32 for a conversion). ``config``: see :func:`convert`.
    """
    path = Path(path_or_preset).expanduser()
    if path.is_dir() and (path / MANIFEST).exists():
        return load_converted(path, component, dtype)
    preset = None if path.exists() else presets.find(str(path_or_preset))
    if preset is not None and preset.lora:
        return _lora_preset(preset, component, dtype, cache_dir, models_dir)
    if path.is_dir() and (path / PARAMS).is_dir() and not (path / io.PIPELINE_INDEX).exists():
        read_manifest(path)  # a converted folder cut short: say so rather than "no weights"
    entry, component = convert_cached(path_or_preset, component, dtype or "float32", cache_dir, variant=variant,
                                      wrapper=wrapper, models_dir=models_dir, config=config)
    return load_converted(entry, component, dtype)


def _lora_preset(preset, component, dtype, cache_dir, models_dir) -> Pretrained:
    """A LoRA preset: its base preset's model with the LoRA merged at the published scale (the
    base is converted and cached as itself; merging is cheap next to that)."""
    from jdistill.convert import lora

    component = component or preset.default_component
    model = load_pretrained(preset.base, component, dtype, cache_dir, models_dir=models_dir)
    factors = lora.read(presets.locate(preset, models_dir), {component: model}, components=[component])
    if not factors.get(component):
        raise lora.LoRAError(f"preset {preset.name!r}: the LoRA adapts nothing of {preset.base}'s {component}")
    scale = preset.sampler.lora_scale if preset.sampler and preset.sampler.lora_scale is not None else 1.0
    return replace(model, params=lora.merge(model.params, factors[component], scale))


def mismatches(preset: presets.Preset, path) -> list[str]:
    """What in the local copy ``path`` differs from the preset (empty when it is the checkpoint).
    A folder's configs are read as JSON (weights need not be there); a bare file is planned as
    a conversion would plan it (its header is read)."""
    path = Path(path)
    if preset.lora:
        return []  # a LoRA's fit is checked when it is read against its base model
    if preset.is_file or preset.folder == "model":
        with plan(sources.open_source(path, config=preset.file_config)) as work:
            return presets.check(preset, _configs(work))
    return presets.folder_mismatches(preset, path)


def resolve_preset(preset, models_dir=None, hub_cache=None, check: bool = True) -> Path:
    """The local copy of ``preset`` (:func:`presets.locate`), checked against its published values
    (:func:`mismatches`) unless ``check`` is False. Raises :class:`presets.PresetNotFound` or
    :class:`presets.PresetMismatch`. (Loading a preset checks the same values against the plan it
    makes anyway, without this second look.)"""
    preset = presets.get(preset) if isinstance(preset, str) else preset
    path = presets.locate(preset, models_dir, hub_cache)
    if check:
        problems = mismatches(preset, path)
        if problems:
            raise presets.PresetMismatch(presets._mismatch_message(preset, path, problems))
    return path


__all__ = ["convert", "load_pretrained", "load_converted", "convert_cached", "Pretrained", "ConvertReport",
           "save_params", "restore_params", "read_manifest", "is_converted", "default_cache_dir", "staging",
           "converted_configs", "dtype_name", "DTYPES", "mismatches",
           "resolve_preset"]
