"""PyTorch checkpoints -> self-describing jdistill folders (Orbax params + configs), and back.

:func:`convert` reads a model folder, a pipeline folder, a bare checkpoint file or a
preset's local copy, converts each model with its family's converter and writes::

    DST/jdistill.json            the manifest, written last: what was converted, from where, how
    DST/model_index.json         pipelines: copied
    DST/<component>/config.json  the source config (synthesised for a bare original DiT .pt)
    DST/<component>/params/      Orbax PyTree checkpoint of the param tree
    DST/scheduler/, tokenizer*/  copied as they are

(a single model writes ``config.json`` and ``params/`` at the top, component ``"model"``).

The folder is built under a temporary name beside ``DST`` and renamed into place only
when complete, so a conversion killed at any point leaves no folder under the final
name, and a folder without its manifest is never taken for a converted one.

:func:`load_pretrained` restores a converted folder, or converts a PyTorch source on
first use into a cache (``$JDISTILL_CACHE``, default ``~/.cache/jdistill/converted``)
keyed by the source's path, every source file's size and mtime, the dtype, the
component and the jdistill version; later calls restore the cached entry without
reading the PyTorch weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jdistill
from jdistill.errors import MissingInput
from jdistill.convert import engine, io, presets, registry
from jdistill.convert.engine import ConversionError

FORMAT = "jdistill-converted"
FORMAT_VERSION = 1
MANIFEST = io.CONVERTED_MARKER
PARAMS = "params"
SINGLE = "model"  # the component name of a converted single model

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def dtype_name(dtype) -> str:
    """``"bf16"`` / ``jnp.bfloat16`` / ``np.dtype`` -> ``"bfloat16"``."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"params are stored as float32, bfloat16 or float16, not {name}")
    return name


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


@dataclass
class ConvertReport:
    source: str
    destination: str
    kind: str  # "model", "pipeline" or "file"
    dtype: str
    components: list[ComponentReport] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        total = sum(c.bytes for c in self.components)
        lines = [f"converted {self.source} ({self.kind}) -> {self.destination}: {len(self.components)} model(s), "
                 f"{_bytes(total)} as {self.dtype}, {self.seconds:.1f} s"]
        for c in self.components:
            lines.append(f"  {c.name:<16} {c.family:<10} {c.class_name:<30} {c.tensors:>6} tensors "
                         f"{_bytes(c.bytes):>10} {c.seconds:6.1f} s" + (f"  (weights: '{c.entry}')" if c.entry else ""))
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
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


# ---------------------------------------------------------------- Orbax I/O


def _checkpointer(save: bool):
    import orbax.checkpoint as ocp

    if not save:
        return ocp.StandardCheckpointer()
    th = ocp.type_handlers
    # The params tree is ours alone until the save returns, so Orbax's defensive copy of every
    # host array is skipped, and so is compression (weights barely compress, and zstd buffers
    # would be a second copy in flight): the save then adds no copy of the weights.
    handlers = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, th.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=handlers, use_compression=False))


def save_params(path, params) -> None:
    """Write a param tree (numpy or jax leaves) as an Orbax checkpoint at ``path`` (must not exist)."""
    import orbax.checkpoint as ocp

    ckptr = _checkpointer(save=True)
    try:
        ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(params))
    finally:
        ckptr.close()


def restore_params(path, abstract, what: str = "params"):
    """Restore ``abstract`` (a tree of ShapeDtypeStructs: the model's, in the wanted dtype) from
    ``path``, as jax arrays on the default device; stored values are cast to the abstract dtype."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
    ckptr = _checkpointer(save=False)
    try:
        out = ckptr.restore(Path(path).absolute(), target)
    except Exception as e:  # orbax / tensorstore raise many kinds: name the folder and the cause
        raise ConversionError(f"{what} at {path} do not restore into the model built from its config "
                              f"({type(e).__name__}: {_first(e)}); convert the checkpoint again with this "
                              "jdistill") from e
    finally:
        ckptr.close()
    bad = [f"{jax.tree_util.keystr(k)}: stored {tuple(a.shape)}, model {tuple(b.shape)}"
           for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(abstract))
           if tuple(a.shape) != tuple(b.shape)]
    if bad:
        raise ConversionError(f"{what} at {path} do not fit the model built from its config: {bad[:10]}")
    return out


def _first(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


# ---------------------------------------------------------------- planning a conversion


@dataclass
class _Job:
    name: str  # component name ("model" for a single model)
    rel: str  # folder inside the destination ("." for a single model)
    family: registry.Family
    config: dict
    source: io.ModelSource


@dataclass
class _Plan:
    kind: str
    source: io.ModelSource | io.PipelineSource
    jobs: list[_Job]
    copies: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _model_job(name: str, rel: str, ms: io.ModelSource) -> _Job:
    if ms.config is None:  # a bare checkpoint file: the family and config come from its keys
        with ms.open() as sd:
            family, config = registry.detect_checkpoint(sd, where=os.fspath(ms.path))
    else:
        config = ms.config
        family = registry.family_for_config(config, where=os.fspath(ms.path / io.CONFIG_NAME))
    family.load(what=f"{ms.path} ({ms.class_name or family.description})")
    return _Job(name, rel, family, config, ms)


def plan(source: io.ModelSource | io.PipelineSource, components: Sequence[str] | None = None) -> _Plan:
    """What converting ``source`` will do, every family checked before any weight is read."""
    if isinstance(source, io.ModelSource):
        if components and list(components) != [SINGLE]:
            raise ValueError(f"{source.path} is a single model: there are no components to pick "
                             f"(asked for {list(components)})")
        return _Plan("model" if source.config is not None else "file", source, [_model_job(SINGLE, ".", source)])

    wanted = list(components) if components else None
    if wanted:
        unknown = [c for c in wanted if c not in source.models]
        if unknown:
            why = {c: source.absent.get(c) or ("not a model: copied as it is" if c in source.folders else
                                               "not in model_index.json") for c in unknown}
            raise ValueError(f"{source.path}: cannot convert {why}; model components: {sorted(source.models)}")
    out = _Plan("pipeline", source, [], copies=dict(source.folders))
    unsupported = []
    for name, ms in source.models.items():
        if wanted is not None and name not in wanted:
            out.skipped[name] = "not selected"
            continue
        aux = registry.AUXILIARY_CLASSES.get(ms.class_name)
        if aux and wanted is None:
            out.skipped[name] = aux
            continue
        try:
            out.jobs.append(_model_job(name, name, ms))
        except registry.UnsupportedModel as e:
            unsupported.append(f"{name}: {e}")
    if unsupported:
        raise registry.UnsupportedModel(
            f"{source.path}: {len(unsupported)} component(s) cannot be converted:\n  " + "\n  ".join(unsupported)
            + f"\nconvert the others with components={[j.name for j in out.jobs]} (--component NAME)")
    for name, why in source.absent.items():
        if wanted is None:
            out.skipped[name] = why
    if not out.jobs:
        raise ValueError(f"{source.path}: no model component to convert (models: {sorted(source.models)})")
    return out


# ---------------------------------------------------------------- writing atomically


_HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dst: Path) -> None:
    """Temporary folders of conversions to ``dst`` whose process is gone (killed mid-write).
    Only this host's: a cache on a shared filesystem may hold another host's live conversion."""
    rx = re.compile(rf"\.{re.escape(dst.name)}\.(partial|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    for p in dst.parent.iterdir():
        m = rx.fullmatch(p.name)
        if m and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staging(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``dst``, renamed to ``dst`` when the block completes, removed if
    it raises. The rename is atomic on one filesystem: ``dst`` is either absent or complete."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dst)
    tag = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            if not overwrite:
                raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
            old = dst.parent / f".{dst.name}.old-{tag}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dst)
            except OSError as e:  # another process renamed its own copy into place first
                raise FileExistsError(f"{dst} appeared while converting: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _convert_job(job: _Job, out: Path, dtype: str) -> ComponentReport:
    t0 = time.perf_counter()
    conv = job.family.load()
    jdt = DTYPES[dtype]
    where = os.fspath(job.source.weights)
    try:
        module = conv.module_from_config(job.config, dtype=jdt, param_dtype=jdt)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{job.source.path}: its config does not describe a {job.family.name} model: {e}") from e
    with job.source.open() as sd:
        entry = sd.unwrapped
        try:
            params = conv.load_params(sd, module)
        except ConversionError as e:
            raise type(e)(f"{where}" + (f" [{entry}]" if entry else "") + f": {e}") from e
    leaves = jax.tree.leaves(params)
    tensors, nbytes = len(leaves), sum(int(np.asarray(x).nbytes) for x in leaves)
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / PARAMS, params)
    del params, leaves  # the tree is the conversion's one copy of the weights: free it before the next
    if job.source.config is not None:  # the source's own file, byte for byte
        shutil.copyfile(job.source.path / io.CONFIG_NAME, out / io.CONFIG_NAME)
    else:  # a bare checkpoint: the config read off its keys
        _write_json(out / io.CONFIG_NAME, job.config)
    return ComponentReport(job.name, job.family.name, job.source.class_name or job.config.get("_class_name", ""),
                           tensors, nbytes, time.perf_counter() - t0, where, entry)


def _resolve_src(src, models_dir=None) -> tuple[Path, presets.Preset | None]:
    path = Path(src).expanduser()
    if path.exists():
        return path, None
    preset = presets.find(str(src))
    if preset is None:
        raise MissingInput(f"{src}: no such file or folder, and not a preset name "
                                f"(presets: {', '.join(presets.PRESETS)})")
    return presets.resolve(preset, models_dir=models_dir), preset


def convert(src, dst, *, dtype="float32", components: Sequence[str] | None = None, variant: str | None = None,
            wrapper: str | None = None, overwrite: bool = False, models_dir=None) -> ConvertReport:
    """Convert ``src`` (a model / pipeline folder, a checkpoint file, or a preset name) into the
    jdistill folder ``dst``: every model component (or ``components``), params stored as
    ``dtype``; configs, ``model_index.json``, scheduler and tokenizer folders copied.

    Every component's family is checked before any weight is read; an unsupported one is an
    error naming it (convert the rest with ``components``). ``dst`` appears only complete.
    """
    t0 = time.perf_counter()
    dtype = dtype_name(dtype)
    if isinstance(src, (io.ModelSource, io.PipelineSource)):
        source = src
    else:
        path, _ = _resolve_src(src, models_dir)
        source = io.open_source(path, variant=variant, wrapper=wrapper)
    work = plan(source, components)
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    report = ConvertReport(os.fspath(source.path), os.fspath(dst), work.kind, dtype, skipped=dict(work.skipped))
    with staging(dst, overwrite) as tmp:
        for job in work.jobs:
            report.components.append(_convert_job(job, tmp / job.rel, dtype))
        if isinstance(source, io.PipelineSource):
            shutil.copyfile(source.path / io.PIPELINE_INDEX, tmp / io.PIPELINE_INDEX)
            for name, folder in work.copies.items():
                shutil.copytree(folder, tmp / name)
                report.copied.append(name)
        report.seconds = time.perf_counter() - t0
        _write_json(tmp / MANIFEST, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "jdistill_version": jdistill.__version__,
            "kind": work.kind, "source": os.fspath(source.path), "dtype": dtype,
            "components": {c.name: {"path": j.rel, "family": c.family, "class_name": c.class_name,
                                    "tensors": c.tensors, "bytes": c.bytes, "source": c.source,
                                    "checkpoint_entry": c.entry}
                           for c, j in zip(report.components, work.jobs)},
            "copied": report.copied, "skipped": report.skipped,
        })
    return report


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


def _pick(names: Sequence[str], component: str | None, where) -> str:
    if component is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(f"{where} holds {len(names)} models {sorted(names)}: pass component=")
    if component not in names:
        raise ValueError(f"{where} has no component {component!r}; it holds {sorted(names)}")
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


def default_cache_dir() -> Path:
    return Path(os.environ.get("JDISTILL_CACHE") or "~/.cache/jdistill/converted").expanduser()


def source_files(source: io.ModelSource | io.PipelineSource, components: Sequence[str] | None = None) -> list[Path]:
    """Every file a conversion of ``source`` (``components`` of a pipeline, default all) is made
    from: configs, weights (index and shards), model_index.json, the folders copied."""
    if isinstance(source, io.ModelSource):
        return source.files()
    out = [source.path / io.PIPELINE_INDEX]
    for name, ms in source.models.items():
        if components is None or name in components:
            out += ms.files()
    for folder in source.folders.values():
        out += sorted(p for p in folder.rglob("*") if p.is_file())
    return out


def cache_key(source: io.ModelSource | io.PipelineSource, dtype: str, components, variant, wrapper) -> str:
    """A digest of everything the converted folder depends on: the source's real path, each
    source file's path, size and mtime, the dtype, the selection, the jdistill version. Only
    file metadata is read: a cache hit opens no weights."""
    root = Path(source.path).absolute()
    files = []
    for f in source_files(source, components):
        st = os.stat(f)  # follows hub-cache symlinks to the blobs they name
        files.append([os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
    payload = {"source": os.path.realpath(root), "files": sorted(files), "dtype": dtype,
               "components": sorted(components or []), "variant": variant, "wrapper": wrapper,
               "jdistill": jdistill.__version__, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def convert_cached(src, component: str | None = None, dtype="float32", cache_dir=None, *, variant=None,
                   wrapper=None, models_dir=None) -> tuple[Path, str | None]:
    """The cache entry holding ``src`` converted (converting it if there is none yet) and the
    component to load from it. Only the requested component of a pipeline is converted."""
    dtype = dtype_name(dtype)
    path, preset = _resolve_src(src, models_dir)
    if preset is not None and component is None:
        component = preset.default_component
    source = io.open_source(path, variant=variant, wrapper=wrapper)
    if isinstance(source, io.PipelineSource):
        component = _pick(sorted(source.models), component, source.path)
        components = [component]
    else:
        if component not in (None, SINGLE):
            raise ValueError(f"{source.path} is a single model: no component {component!r}")
        components, component = None, None
    key = cache_key(source, dtype, components, variant, wrapper)
    # a readable prefix: the preset, or the source's name (a hub snapshot's is a commit hash)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", preset.name if preset else Path(source.path).name)[:60] or "model"
    entry = Path(cache_dir or default_cache_dir()).expanduser().absolute() / f"{slug}-{key}"
    if is_converted(entry):
        return entry, component
    if entry.exists():  # under the final name but incomplete: never ours (we rename in complete folders)
        shutil.rmtree(entry)
    try:
        convert(source, entry, dtype=dtype, components=components)
    except FileExistsError:
        if not is_converted(entry):  # someone else's complete copy is fine; anything else is not
            raise
    return entry, component


def load_pretrained(path_or_preset, component: str | None = None, dtype=None, cache_dir=None, *,
                    variant: str | None = None, wrapper: str | None = None, models_dir=None) -> Pretrained:
    """A model ready to apply: ``module, params = load_pretrained(...)`` (a :class:`Pretrained`,
    which also carries ``config`` and ``family``).

    ``path_or_preset``: a converted jdistill folder (restored as it is), a PyTorch source
    (model folder, pipeline folder, checkpoint file: converted once into ``cache_dir`` and
    restored from there afterwards), or a preset name (its local copy, see
    :mod:`jdistill.convert.presets`; its default component, e.g. the UNet, unless
    ``component``). ``dtype`` is the params' dtype and the module's compute dtype (default:
    as stored; float32 for a conversion).
    """
    path = Path(path_or_preset).expanduser()
    if path.is_dir() and (path / MANIFEST).exists():
        return load_converted(path, component, dtype)
    if path.is_dir() and (path / PARAMS).is_dir() and not (path / io.PIPELINE_INDEX).exists():
        read_manifest(path)  # a converted folder cut short: say so rather than "no weights"
    entry, component = convert_cached(path_or_preset, component, dtype or "float32", cache_dir, variant=variant,
                                      wrapper=wrapper, models_dir=models_dir)
    return load_converted(entry, component, dtype)


__all__ = ["convert", "load_pretrained", "load_converted", "convert_cached", "Pretrained",
           "ConvertReport", "save_params", "restore_params", "read_manifest", "is_converted", "default_cache_dir"]
