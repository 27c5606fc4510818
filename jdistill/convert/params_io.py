"""Param trees on disk: one Orbax PyTree checkpoint per converted model.

Saving skips Orbax's defensive host copy and compression, so writing a converted tree adds
no second copy of the weights; restoring casts to the abstract tree's dtype and checks
every shape against the model built from the stored config.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jdistill.convert.engine import ConversionError


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
