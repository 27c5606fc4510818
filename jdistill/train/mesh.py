"""Device mesh and batch sharding.

The mesh has three axes, ("data", "fsdp", "tensor"). A batch is split over the first
two (every device of a tensor group sees the same rows); params and optimizer state
are laid out by logical-axis rules (``jdistill.train.partitioning``): by default
split over "fsdp" (ZeRO-3 style) and, for attention heads and MLP width, over
"tensor". On one device all of this collapses to no sharding, so one code path
serves a laptop, a GPU box and a TPU pod.

JAX 0.10 makes meshes with Explicit axis types by default; jdistill uses
GSPMD-style ``jax.jit(in_shardings=..., out_shardings=...)`` and so builds
its meshes with Auto axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jdistill.errors import InvalidArgument

AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all); ``data=-1`` takes what the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if int(size) < 1:
            raise InvalidArgument(f"mesh {name}={size}: must be >= 1")
    if data == -1:
        if n % (fsdp * tensor):
            raise InvalidArgument(f"fsdp={fsdp} x tensor={tensor} does not divide the {n} devices")
        data = n // (fsdp * tensor)
    if data < 1 or data * fsdp * tensor != n:
        raise InvalidArgument(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} "
                              f"devices, {n} present")
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def from_config(mesh_cfg) -> Mesh:
    """The mesh a config's ``mesh`` section asks for (``data``, ``fsdp``, optional ``tensor``)."""
    return make_mesh(int(mesh_cfg.get("data", -1)), int(mesh_cfg.get("fsdp", 1)), int(mesh_cfg.get("tensor", 1)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axes (replicated over "tensor")."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


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
