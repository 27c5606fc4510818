"""Device mesh, batch sharding and FSDP partition rules.

The mesh has two axes, ("data", "fsdp"). A batch is split over both (every
device sees a different slice); params and optimizer state are split over
"fsdp" only (ZeRO-3 style) and replicated over "data". On one device all of
this collapses to no sharding, so one code path serves a laptop, a GPU box
and a TPU pod.

JAX 0.10 makes meshes with Explicit axis types by default; jdistill uses
GSPMD-style ``jax.jit(in_shardings=..., out_shardings=...)`` and so builds
its meshes with Auto axes.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all); ``data=-1`` takes what fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} present")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = 2**14) -> P:
    """Default FSDP rule: split the largest dimension that ``fsdp`` divides, for arrays of at
    least ``min_size`` elements; small arrays (biases, norms) stay replicated."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def partition_specs(tree, mesh: Mesh, rules: Iterable[tuple[str, P]] = (), min_size: int = 2**14):
    """A PartitionSpec per leaf of ``tree`` (arrays or ShapeDtypeStructs).

    ``rules`` are (regex, PartitionSpec) pairs searched against the leaf's path
    ("opt_state/0/mu/blocks_0/attn/to_q/kernel"), first match wins; leaves no
    rule names get :func:`fsdp_spec`. Because optimizer moments share their
    param's path suffix and shape, they land where their param does.
    """
    rules = [(re.compile(rx), spec) for rx, spec in rules]
    fsdp = mesh.shape["fsdp"]

    def spec_for(path, leaf):
        if not hasattr(leaf, "shape") or len(getattr(leaf, "shape", ())) == 0:
            return P()
        name = _path_str(path)
        for rx, spec in rules:
            if rx.search(name):
                return spec
        return fsdp_spec(leaf.shape, fsdp, min_size)

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def shardings(tree, mesh: Mesh, rules: Iterable[tuple[str, P]] = (), min_size: int = 2**14):
    """NamedShardings for ``tree`` under :func:`partition_specs`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, mesh, rules, min_size),
                        is_leaf=lambda x: isinstance(x, P))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice of the batch into global arrays split over the mesh.

    On one process this is a device_put; on many (TPU pods, GPU clusters) each
    process contributes the rows it loaded (process ``i`` holds rows
    ``[i * B / P, (i + 1) * B / P)``).
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local)


def describe_sharding(tree) -> dict[str, str]:
    """{path: spec} for logging which params are split where."""
    flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
    return {k: str(getattr(getattr(v, "sharding", None), "spec", "")) for k, v in flat.items()}
