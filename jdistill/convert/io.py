"""Reading public PyTorch checkpoints without loading them whole.

Every reader hands the converter a :class:`LazyStateDict`: a mapping whose keys (and
shapes) are known up front and whose tensors are read one at a time, when asked for,
and not kept. With the engine keeping only its output, converting a model holds the
output tree plus one tensor in anonymous memory; the source file is memory-mapped, so
its pages are page cache the kernel can drop, not a copy.

Formats:

* ``.safetensors``: ``safetensors.safe_open`` (header parsed at open, each tensor
  copied out of the mapping on access);
* sharded safetensors / ``.bin``: ``*.safetensors.index.json`` /
  ``*.bin.index.json`` (the ``weight_map`` names each key's shard);
* ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``: ``torch.load(weights_only=True, mmap=True)``,
  then :func:`unwrap` of training-checkpoint wrappers; a pickle that holds anything but
  tensors and plain containers is refused, never unpickled;
* the weights of a diffusers / transformers model folder (:func:`find_weights`), with
  optional ``variant`` files (``*.fp16.safetensors``).

What a folder or file *is* (a model, a pipeline, a single-file checkpoint) is
:mod:`jdistill.convert.sources`' question; this module only reads tensors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from jdistill.errors import MissingInput, UserError

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONFIG_NAME = "config.json"
PIPELINE_INDEX = "model_index.json"
# The converted-folder marker (written by jdistill.convert.pretrained); a reader refuses it as a source.
CONVERTED_MARKER = "jdistill.json"

# Wrapper keys of training checkpoints, in the order they are taken (see :func:`unwrap`).
WRAPPER_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_model", "state_dict", "model", "module")

# diffusers / transformers weight file names: stem, optional variant, format; shards and
# index files named after the same stems.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_SINGLE = re.compile(rf"^({'|'.join(_WEIGHT_STEMS)})(?:\.(\w+))?\.(safetensors|bin)$")
_INDEX = re.compile(rf"^({'|'.join(_WEIGHT_STEMS)})\.(safetensors|bin)\.index(?:\.(\w+))?\.json$")


class CheckpointReadError(UserError, ValueError):
    """A file or folder that cannot be read as a checkpoint: names it and says why."""


def _is_tensor(x) -> bool:
    return isinstance(x, np.ndarray) or (type(x).__module__.startswith("torch") and hasattr(x, "shape"))


def unwrap(checkpoint: Mapping, key: str | None = None, *, where: str = "checkpoint") -> tuple[Mapping, str]:
    """The state dict inside a training checkpoint, and the path of keys that led to it.

    The rule: with ``key`` (dotted, e.g. ``"state_dict"`` or ``"model"``) that entry is
    taken. Otherwise the first of :data:`WRAPPER_KEYS` whose value is a mapping is
    taken, and the rule applies again inside it; EMA weights come first because the
    released samplers load them (the original DiT script saves ``{"model", "ema",
    "opt", "args"}`` and samples from ``ema``). A mapping with no such entry is the
    state dict itself; it must then hold only tensors.
    """
    path: list[str] = []
    if key:
        for part in key.split("."):
            if not isinstance(checkpoint, Mapping) or part not in checkpoint:
                raise CheckpointReadError(f"{where}: no entry {'.'.join(path + [part])!r} to unwrap; top-level keys: "
                                          f"{_sample(checkpoint)}")
            checkpoint, path = checkpoint[part], path + [part]
    while isinstance(checkpoint, Mapping):
        inner = next((k for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            break
        checkpoint, path = checkpoint[inner], path + [inner]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointReadError(f"{where}: {'.'.join(path) or 'the file'} holds a {type(checkpoint).__name__}, "
                                  "not a state dict")
    odd = [k for k, v in checkpoint.items() if not _is_tensor(v)]
    if odd:
        raise CheckpointReadError(
            f"{where}: {'.'.join(path) or 'the top level'} is not a state dict: entries {odd[:8]} are not tensors, "
            f"and none of the wrapper keys {list(WRAPPER_KEYS)} holds one; pick the entry with wrapper=KEY")
    return checkpoint, ".".join(path)


def _sample(mapping, n: int = 8):
    return sorted(map(str, mapping))[:n] if isinstance(mapping, Mapping) else type(mapping).__name__


# ---------------------------------------------------------------- single files


class _SafetensorsFile:
    """One safetensors file: header read at open, tensors copied out of the mapping on access."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(os.fspath(path), framework="numpy")
            self.keys = list(self._handle.keys())
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
            raise CheckpointReadError(f"{path}: cannot be read as safetensors ({e}); the file may be truncated or "
                                      "still downloading") from e

    def get(self, key: str):
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise CheckpointReadError(f"{self.path}: tensor {key!r} cannot be read ({e})") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def close(self):
        self._handle = None


class _TorchFile:
    """A ``torch.save`` file, memory-mapped: its tensors stay on disk until touched."""

    def __init__(self, path: Path, wrapper: str | None = None):
        self.path = path
        state, self.unwrapped = unwrap(_torch_load(path), wrapper, where=os.fspath(path))
        self._state = state
        self.keys = list(state.keys())

    def get(self, key: str):
        return self._state[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)  # a mapped tensor: no bytes are read for its shape

    def close(self):
        self._state = None


def _torch_load(path: Path):
    try:
        import torch
    except ImportError as e:
        raise CheckpointReadError(f"{path}: reading a PyTorch pickle needs torch installed "
                                  "(safetensors files do not)") from e
    import argparse

    # argparse.Namespace: the training args the original DiT (and many repos) save beside the
    # weights; it holds plain values, so allowing it keeps weights_only's guarantee.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise CheckpointReadError(f"{path}: cannot be read by torch.load ({_first_line(e)}); the file may be "
                                          "truncated or not a PyTorch checkpoint") from e
        except Exception as e:  # UnpicklingError for objects weights_only refuses, EOFError, zip errors
            raise CheckpointReadError(
                f"{path}: torch.load(weights_only=True) refused it ({_first_line(e)}). jdistill only reads "
                "checkpoints whose pickles hold tensors and plain containers; re-save the state dict with "
                "torch.save(state_dict) or safetensors if you trust the file") from e
        # a legacy (pre-zip) pickle cannot be mapped: it is read whole, once
        return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------- the lazy mapping


class LazyStateDict(Mapping):
    """A state dict spread over one or more files; each tensor is read when indexed and
    not cached. ``files`` lists every file it reads (for messages and cache keys)."""

    def __init__(self, where: dict[str, Any], files: list[Path], description: str, unwrapped: str = ""):
        self._where = where
        self.files = files
        self.description = description
        self.unwrapped = unwrapped  # the wrapper path taken inside a torch checkpoint ("" when none)

    def __getitem__(self, key):
        return self._where[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def get(self, key, default=None):
        # Mapping.get would index first: a read (and a KeyError) for a key that is not there
        return self[key] if key in self._where else default

    def shape(self, key) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (safetensors) or its mapping (torch): no
        tensor data is read, so a layout can be recognised and a config read off a file of any
        size at the cost of its header."""
        return self._where[key].shape(key)

    def close(self):
        """Release the file mappings (the mapping is unusable afterwards)."""
        for reader in {id(r): r for r in self._where.values()}.values():
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"LazyStateDict({self.description}, {len(self)} tensors)"


def _from_readers(readers, files, description, unwrapped="") -> LazyStateDict:
    where: dict[str, Any] = {}
    for r in readers:
        for k in r.keys:
            if k in where:
                raise CheckpointReadError(f"{description}: key {k!r} is in both {where[k].path} and {r.path}")
            where[k] = r
    return LazyStateDict(where, files, description, unwrapped)


def _open_index(index: Path, wrapper: str | None) -> LazyStateDict:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"{index}: not a readable shard index with a weight_map ({e})") from e
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (index.parent / s).is_file()]
    if absent:
        raise CheckpointReadError(f"{index}: {len(absent)} of {len(shards)} shards are missing: {absent[:5]}")
    readers = [_open_file(index.parent / s, wrapper) for s in shards]
    sd = _from_readers(readers, [index] + [r.path for r in readers], os.fspath(index))
    listed = set(weight_map)
    if listed != set(sd.keys()):
        extra, lost = sorted(set(sd.keys()) - listed), sorted(listed - set(sd.keys()))
        raise CheckpointReadError(f"{index}: the index and its shards disagree: {len(lost)} listed keys are in no "
                                  f"shard {lost[:5]}, {len(extra)} shard keys are not listed {extra[:5]}")
    for k, shard in weight_map.items():
        if sd._where[k].path.name != shard:
            raise CheckpointReadError(f"{index}: {k!r} is listed in {shard} but stored in {sd._where[k].path.name}")
    return sd


def _open_file(path: Path, wrapper: str | None = None):
    if path.name.endswith(".safetensors"):
        if wrapper:
            raise CheckpointReadError(f"{path}: a safetensors file holds a flat state dict; wrapper={wrapper!r} "
                                      "applies to torch training checkpoints only")
        return _SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return _TorchFile(path, wrapper)
    raise CheckpointReadError(f"{path}: not a checkpoint file (expected .safetensors, {', '.join(TORCH_SUFFIXES)} or "
                              "a *.index.json shard index)")


def open_state_dict(path, *, variant: str | None = None, wrapper: str | None = None) -> LazyStateDict:
    """A lazy state dict from a checkpoint file, a shard index, or a model folder (its weights
    found by :func:`find_weights`). ``wrapper`` picks the entry of a torch training checkpoint
    (default: :func:`unwrap`'s rule)."""
    path = Path(path)
    if path.is_dir():
        path = find_weights(path, variant)
    if not path.is_file():
        raise MissingInput(f"no checkpoint at {path}")
    if path.name.endswith(".json"):
        return _open_index(path, wrapper)
    reader = _open_file(path, wrapper)
    return _from_readers([reader], [path], os.fspath(path), getattr(reader, "unwrapped", ""))


def find_weights(folder, variant: str | None = None) -> Path:
    """The weights of a diffusers / transformers model folder: the file (or shard index) to open.

    Preference: the requested ``variant`` (``"fp16"`` -> ``*.fp16.safetensors``), else the
    plain files, else the only variant present; safetensors over ``.bin``; a single file over
    a shard index of the same kind. Several variants and no plain file is an error that
    names them (pass ``variant``).
    """
    folder = Path(folder)
    found = _scan_weights(folder)
    if not found:
        raise CheckpointReadError(f"{folder}: no weights (expected diffusion_pytorch_model*.safetensors / .bin, "
                                  f"model*.safetensors or pytorch_model*.bin, or their *.index.json); it holds "
                                  f"{_listing(folder)}")
    variants = sorted({v for v, _ in found if v is not None})
    if variant is not None:
        if not any(v == variant for v, _ in found):
            raise CheckpointReadError(f"{folder}: no {variant!r} variant; variants present: {variants or 'none'}")
        chosen = variant
    elif any(v is None for v, _ in found):
        chosen = None
    elif len(variants) == 1:
        chosen = variants[0]
    else:
        raise CheckpointReadError(f"{folder}: only variant weights {variants}, no plain ones: pass variant=...")
    for fmt in ("safetensors", "bin"):
        candidates = found.get((chosen, fmt), [])
        singles = [c for c in candidates if not c.name.endswith(".json")]
        if singles:
            # diffusers' name before transformers', as diffusers loads it
            return min(singles, key=lambda p: _WEIGHT_STEMS.index(p.name.split(".")[0]))
        if candidates:
            return candidates[0]
    raise AssertionError("unreachable: a chosen variant always has a file")


def _scan_weights(folder: Path) -> dict[tuple[str | None, str], list[Path]]:
    """(variant, format) -> the weight files / shard indexes of that kind in ``folder``."""
    found: dict[tuple[str | None, str], list[Path]] = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else ():
        m, i = _SINGLE.match(f.name), _INDEX.match(f.name)
        if m:
            found.setdefault((m.group(2), m.group(3)), []).append(f)
        elif i:
            found.setdefault((i.group(3), i.group(2)), []).append(f)
    return found


def _listing(folder: Path, n: int = 12) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())[:n]
    except OSError:
        return []


# ---------------------------------------------------------------- configs


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise CheckpointReadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointReadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
