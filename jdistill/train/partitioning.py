"""Where every param, optimizer moment and average lives on the mesh: logical axes and rules.

As in MaxText / MaxDiffusion, a parameter's dimensions carry *logical* names (``embed``,
``heads``, ``mlp``, ``vocab``, ``conv_out``) and a config's rules map each to mesh axes:

    rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ...)

jdistill's modules carry diffusers' / transformers' attribute names, so a weight's role is
in its path (``.../attn/to_q/kernel`` is embed -> heads): :data:`PARAM_AXES` reads the
logical axes off the path, and optimizer moments and averages, whose paths end like
their param's, land where their param does. A dimension is split only when the mesh
axes divide it (else it stays whole on that axis), and arrays under ``min_size``
elements (biases, norms) stay replicated. Params no pattern names fall back to
splitting their largest dimension that "fsdp" divides.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (regex on the path, logical axes); first match wins
PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    (r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|q_proj|k_proj|v_proj|qkv|/q|/k|/v)/kernel$",
     ("embed", "heads")),
    (r"(to_out_0|to_add_out|out_proj|/o)/kernel$", ("heads", "embed")),
    (r"(net_0/proj|fc1|/wi|/wi_0|/wi_1)/kernel$", ("embed", "mlp")),
    (r"(net_2|fc2|/wo)/kernel$", ("mlp", "embed")),
    (r"/embedding$", ("vocab", "embed")),
)

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "fsdp"),
)

MIN_SIZE = 2**14


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_axes(path: str, shape: Sequence[int], param_axes=PARAM_AXES) -> tuple | None:
    """Logical names of a param's dimensions, or None when nothing names them."""
    for rx, axes in param_axes:
        if len(axes) == len(shape) and re.search(rx, path):
            return tuple(axes)
    if len(shape) == 4:  # conv kernels, HWIO
        return (None, None, "conv_in", "conv_out")
    if len(shape) == 2 and path.endswith("kernel"):  # any other dense layer
        return ("embed", "mlp")
    return None


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def resolve(axes: Sequence, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """A PartitionSpec for logical ``axes``: each dimension gets its rule's mesh axes when they
    divide it and are not used by an earlier dimension (else a subset that does, else none)."""
    rules = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, axes):
        wanted = [a for a in _as_tuple(rules.get(name)) if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        chosen = ()
        for cand in [tuple(wanted)] + [(a,) for a in wanted]:
            size = int(np.prod([mesh.shape[a] for a in cand])) if cand else 1
            if cand and dim % size == 0:
                chosen = cand
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*spec)


# (mesh, rules) of the step being traced; None outside a sharded step (sampling, tests on one device)
_ACTIVATION_LAYOUT = contextvars.ContextVar("jdistill_activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(mesh: Mesh, rules: Iterable | None = None):
    """While tracing a sharded step: :func:`constrain` pins activations to ``mesh`` by ``rules``.

    Without it nothing in a network tells the SPMD partitioner where activations live, and it
    chose to contract matmuls over the fsdp-sharded embed dimension and all-reduce the
    activations instead of gathering the weights (docs/pod-scale.md). MaxText and MaxDiffusion
    annotate activations for the same reason."""
    token = _ACTIVATION_LAYOUT.set((mesh, tuple(rules) if rules is not None else DEFAULT_RULES))
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def constrain(x, axes: Sequence):
    """``x`` with its dimensions, named by the logical ``axes``, laid out on the traced step's
    mesh (under :func:`activation_layout`; unchanged elsewhere). A dimension the rule's mesh axes
    do not divide stays whole, as for params."""
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None:
        return x
    mesh, rules = layout
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, resolve(axes, x.shape, mesh, rules)))


def constrain_batch(x):
    """:func:`constrain` of an activation whose leading dimension is the batch (FSDP's layout:
    every other dimension whole on each device, the weights gathered to meet it)."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def largest_dim_spec(shape: Sequence[int], fsdp: int) -> P:
    """The fallback: split the largest dimension that ``fsdp`` divides."""
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if fsdp > 1 and shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def partition_specs(tree, mesh: Mesh, rules: Iterable | None = None, *, min_size: int = MIN_SIZE,
                    param_axes=PARAM_AXES):
    """A PartitionSpec per leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    rules = tuple(DEFAULT_RULES if rules is None else rules)

    def spec_for(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) == 0 or int(np.prod(shape, dtype=np.int64)) < min_size:
            return P()
        axes = logical_axes(path_str(path), shape, param_axes)
        if axes is None:
            return largest_dim_spec(shape, mesh.shape.get("fsdp", 1))
        return resolve(axes, shape, mesh, rules)

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def shardings(tree, mesh: Mesh, rules: Iterable | None = None, *, min_size: int = MIN_SIZE):
    """NamedShardings for ``tree`` under :func:`partition_specs`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, mesh, rules, min_size=min_size),
                        is_leaf=lambda x: isinstance(x, P))


def state_shardings(state, mesh: Mesh, rules: Iterable | None = None, *, min_size: int = MIN_SIZE):
    """Shardings of a TrainState: params, optimizer moments and averages by the rules; scalars replicated."""
    return shardings(state, mesh, rules, min_size=min_size)


def rules_from_config(mesh_cfg) -> tuple | None:
    """``mesh.rules`` of a config (a list of [logical axis, mesh axis or list]) or None for the defaults."""
    rules = mesh_cfg.get("rules") if mesh_cfg is not None else None
    if not rules:
        return None
    out = []
    for item in rules:
        name, axes = item
        out.append((str(name), None if axes is None else axes if isinstance(axes, str) else tuple(axes)))
    return tuple(out)


def place(tree, shardings_):
    """Put a host or device tree onto the given shardings (works across processes)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
                        if not isinstance(x, jax.Array) else jax.device_put(x, s), tree, shardings_)


def abstract_like(tree, shardings_=None):
    """ShapeDtypeStructs of ``tree``, carrying ``shardings_`` (a matching tree) when given."""
    if shardings_ is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings_)


def describe(tree) -> dict[str, str]:
    """{path: spec} of a placed tree, for logging which params are split where."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[path_str(path)] = str(getattr(getattr(leaf, "sharding", None), "spec", ""))
    return out


__all__ = ["DEFAULT_RULES", "PARAM_AXES", "abstract_like", "describe", "logical_axes", "partition_specs", "place",
           "resolve", "rules_from_config", "shardings", "state_shardings", "activation_layout", "constrain",
           "constrain_batch"]
