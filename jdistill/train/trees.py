"""Param trees with holes: a part's trainable params split from its frozen ones.

``split(params, mask)`` gives two trees shaped like ``params`` with ``None`` where the
other one has the leaf; :func:`combine` puts them back together (and completes an
average, which holds trainable leaves only, from the full params).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _is_none(x):
    return x is None


def split(params, mask):
    """(trainable, fixed) for a mask of bools shaped like ``params`` (or params -> such a mask);
    ``mask=None`` trains everything and returns (params, None)."""
    if mask is None:
        return params, None
    mask = mask(params) if callable(mask) else mask
    flags = jax.tree.structure(params).flatten_up_to(mask)
    leaves, treedef = jax.tree.flatten(params)
    return (treedef.unflatten([p if f else None for p, f in zip(leaves, flags)]),
            treedef.unflatten([None if f else p for p, f in zip(leaves, flags)]))


def combine(trainable, rest):
    """``trainable`` with its ``None`` holes filled from ``rest`` (the fixed part, or full params)."""
    if rest is None:
        return trainable
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, rest, is_leaf=_is_none)


def all_finite(*trees) -> jax.Array:
    """Whether every float leaf of ``trees`` is finite (a scalar bool array)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)
