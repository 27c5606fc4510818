"""Telling a damaged checkpoint from a good one, and naming the damaged file.

A resume or a sampling read must never take a damaged checkpoint for a good one, and a
user must learn *which* file is damaged, not a TensorStore spec. Two checks:

* :func:`inspect` reads a step's structure without its array data: the commit marker
  Orbax writes last (``_CHECKPOINT_METADATA`` with a commit time), every item's metadata,
  and, for the OCDBT store the state is written in, the B-tree (``ts.ocdbt.dump``) down to
  every value's data file: present, long enough for the byte range the tree points at, and
  starting with the chunk codec's magic. A deleted, truncated or zero-filled file is caught
  here, before any array is read.
* :func:`fingerprint`: one uint32 per array, a position-weighted wrapping sum of its
  words, written into the checkpoint's meta when it is saved and compared after a read.
  It catches what reads without an error but is wrong: a flipped bit inside a
  zstd-compressed chunk decodes silently (TensorStore keeps no checksum of values).
  Integer wrapping sums are exact in any reduction order, so the value does not depend on
  the sharding or the device count.

A read that fails anyway is diagnosed by :func:`diagnose`: an array TensorStore could not
read is named with the data file that holds it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

COMMIT_MARKER = "_CHECKPOINT_METADATA"  # Orbax writes it, with the commit time, when a step is final
ITEMS = {"state": "_METADATA", "config": "metadata", "meta": "metadata"}
FINGERPRINT_KEY = "fingerprint"  # in the checkpoint's meta: {array name: uint32}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")  # value types Orbax stores as zarr arrays


@dataclasses.dataclass(frozen=True)
class Damage:
    """What is wrong with one checkpoint step: the file (relative to the step folder) and how."""

    step: int
    file: str
    problem: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.file}: {self.problem}"


# -- fingerprints --------------------------------------------------------------------------

def array_name(keypath) -> str:
    """The name Orbax stores an array under ("parts.model.params.conv.kernel")."""
    return ".".join(ocp.tree.str_keypath(keypath))


def _words(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    width = x.dtype.itemsize
    if width not in (1, 2, 4):
        raise TypeError(f"cannot fingerprint {x.dtype} arrays")
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _fingerprints(leaves):
    def one(x):
        w = _words(x)
        weight = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(w * weight, dtype=jnp.uint32)  # odd weights: any single flipped bit changes the sum

    return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def fingerprint(tree) -> dict[str, int]:
    """{array name: uint32} of every array of ``tree`` (jax or numpy, any sharding)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = np.asarray(_fingerprints([x for _, x in flat]))
    return {array_name(kp): int(v) for (kp, _), v in zip(flat, values)}


def compare_fingerprints(tree, saved: dict | None) -> str | None:
    """The first array of ``tree`` whose fingerprint differs from ``saved`` (None: all equal or
    nothing saved; checkpoints written before fingerprints have none)."""
    if not saved:
        return None
    for name, value in fingerprint(tree).items():
        if name in saved and int(saved[name]) != value:
            return name
    return None


# -- structure ----------------------------------------------------------------------------

def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + " ..."


def _location(loc: str) -> tuple[str, int, int]:
    """("ocdbt.process_0/d/<id>", offset, length) from a dump location "value:<base>:<rel>:<off>:<len>"."""
    body = loc.split(":", 1)[1]
    file_id, offset, length = body.rsplit(":", 2)
    base, _, rel = file_id.partition(":")
    return base + rel, int(offset), int(length)


def value_files(state_dir: str) -> tuple[dict[str, list[tuple[str, int, int]]], dict[str, dict]]:
    """Walk the state's OCDBT B-tree: ({array name: [(data file, offset, length), ...]},
    {array name: its zarr metadata}). Raises ``_Broken(file, problem)`` when the tree cannot be read."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "file", "path": state_dir.rstrip("/") + "/"}).result()
    try:
        manifest = ts.ocdbt.dump(kv).result()
    except Exception as e:
        raise _Broken("manifest.ocdbt", _first_line(e)) from None
    values, zarr_meta = {}, {}
    versions = manifest.get("versions") or []
    root = versions[-1].get("root", {}).get("location") if versions else None
    pending = [root] if root else []
    while pending:
        loc = pending.pop()
        try:
            node = ts.ocdbt.dump(kv, loc).result()
        except Exception as e:
            raise _Broken(_location(loc)[0], f"B-tree node unreadable ({_first_line(e)})") from None
        for entry in node.get("entries", []):
            key = entry.get("key", b"")
            key = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            for v in entry.values():
                if isinstance(v, str) and v.startswith("btreenode:"):
                    pending.append(v)
            name, _, chunk = key.partition("/")
            if chunk in (".zarray", "zarr.json") and isinstance(entry.get("inline_value"), bytes):
                try:
                    zarr_meta[name] = json.loads(entry["inline_value"])
                except ValueError:
                    raise _Broken("manifest.ocdbt", f"array {name}: unreadable zarr metadata") from None
            elif isinstance(entry.get("indirect_value"), str):
                values.setdefault(name, []).append(_location(entry["indirect_value"]))
    return values, zarr_meta


class _Broken(Exception):
    def __init__(self, file: str, problem: str):
        super().__init__(problem)
        self.file, self.problem = file, problem


def _check_state(state_dir: str) -> None:
    """Raise _Broken for the first damaged file of an OCDBT state item."""
    try:
        meta = _read_json(os.path.join(state_dir, "_METADATA"))
        names = [".".join(str(k["key"]) for k in v["key_metadata"]) for v in meta["tree_metadata"].values()
                 if v["value_metadata"].get("value_type") in ARRAY_TYPES]
    except FileNotFoundError:
        raise _Broken("state/_METADATA", "missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise _Broken("state/_METADATA", f"not Orbax tree metadata ({_first_line(e)})") from None
    # Orbax's other JSON records of the item (shardings, per-process array metadata)
    records = [os.path.join(state_dir, "_sharding")]
    if os.path.isdir(os.path.join(state_dir, "array_metadatas")):
        records += [os.path.join(state_dir, "array_metadatas", f)
                    for f in sorted(os.listdir(os.path.join(state_dir, "array_metadatas")))]
    for path in records:
        if os.path.isfile(path):
            try:
                _read_json(path)
            except (OSError, ValueError) as e:
                raise _Broken(f"state/{os.path.relpath(path, state_dir)}", f"not JSON ({_first_line(e)})") from None
    if not meta.get("use_ocdbt", False):
        return  # one folder per array: the read itself names what it cannot find
    if not os.path.isfile(os.path.join(state_dir, "manifest.ocdbt")):
        raise _Broken("state/manifest.ocdbt", "missing")
    try:
        values, zarr_meta = value_files(state_dir)
    except _Broken as b:
        raise _Broken(f"state/{b.file}", b.problem) from None
    missing = [n for n in names if n not in zarr_meta]
    if missing:
        raise _Broken("state/manifest.ocdbt", f"no stored array {missing[0]} ({len(missing)} of {len(names)} "
                                              "arrays missing)")
    by_file: dict[str, list[tuple[str, int, int]]] = {}
    for name, refs in values.items():
        for file, offset, length in refs:
            by_file.setdefault(file, []).append((name, offset, length))
    for file, refs in sorted(by_file.items()):
        path = os.path.join(state_dir, file)
        if not os.path.isfile(path):
            raise _Broken(f"state/{file}", f"missing (holds {len(refs)} chunk(s), e.g. of {refs[0][0]})")
        size = os.path.getsize(path)
        end = max(o + n for _, o, n in refs)
        if size < end:
            raise _Broken(f"state/{file}", f"truncated: {size} bytes, but chunks reach byte {end}")
        with open(path, "rb") as f:
            for name, offset, _ in refs:
                compressor = (zarr_meta.get(name, {}).get("compressor") or {}).get("id")
                if compressor != "zstd":
                    continue
                f.seek(offset)
                if f.read(4) != ZSTD_MAGIC:
                    raise _Broken(f"state/{file}", f"overwritten: the chunk of {name} at byte {offset} is not "
                                                   "zstd data")


def inspect(step_dir: str, step: int) -> Damage | None:
    """The first damage found in a checkpoint step folder without reading array data (None: intact)."""
    marker = os.path.join(step_dir, COMMIT_MARKER)
    try:
        if not _read_json(marker).get("commit_timestamp_nsecs"):
            return Damage(step, COMMIT_MARKER, "no commit time: the save never finished")
    except FileNotFoundError:
        return Damage(step, COMMIT_MARKER, "missing: the commit marker Orbax writes last is gone, so the step "
                                           "cannot be trusted to be complete")
    except (OSError, ValueError) as e:
        return Damage(step, COMMIT_MARKER, f"unreadable ({_first_line(e)})")
    for item, meta_file in ITEMS.items():
        if not os.path.isdir(os.path.join(step_dir, item)):
            return Damage(step, item, "missing")
        if item != "state":
            try:
                _read_json(os.path.join(step_dir, item, meta_file))
            except FileNotFoundError:
                return Damage(step, f"{item}/{meta_file}", "missing")
            except (OSError, ValueError) as e:
                return Damage(step, f"{item}/{meta_file}", f"not JSON ({_first_line(e)})")
    try:
        _check_state(os.path.join(step_dir, "state"))
    except _Broken as b:
        return Damage(step, b.file, b.problem)
    return None


# -- a read that failed anyway ------------------------------------------------------------

_READ_ERROR = re.compile(r'Error reading "([^"/]+)/[^"]*"')


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        for inner in getattr(e, "exceptions", ()):  # ExceptionGroup
            yield from _chain(inner)
        e = e.__cause__ or e.__context__


def diagnose(error: BaseException, step_dir: str, step: int) -> Damage | None:
    """A Damage when ``error`` (from reading step ``step``) is TensorStore failing to read stored
    data, naming the array and its data file; None when it is something else (a tree that does
    not match, memory, ...)."""
    for e in _chain(error):
        m = _READ_ERROR.search(str(e))
        if not m:
            continue
        name = m.group(1)
        detail = str(e).split(":", 1)[-1] if "]:" not in str(e) else str(e)
        detail = _first_line(Exception(detail.split('": ', 1)[-1]))
        try:
            values, _ = value_files(os.path.join(step_dir, "state"))
            files = sorted({f for f, _, _ in values.get(name, [])})
        except Exception:
            files = []
        where = f"state/{files[0]}" if files else "state"
        return Damage(step, where, f"array {name} cannot be read ({detail})")
    return None
