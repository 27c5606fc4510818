"""Lower and compile one planned step for a mesh, and read what XLA says about it per device.

Runs in a process whose devices ARE the mesh (``jdistill plan`` starts one with as many host
CPU devices as the mesh has): the SPMD partitioner splits the step exactly as it would for
that many accelerators, and the compiled per-device program is what is measured.

* bytes by kind: each argument leaf's shard (``sharding.shard_shape``) times its item size,
  summed over params / optimizer state / averages / frozen trees / batch; these add up to
  XLA's ``argument_size_in_bytes`` plus the leaves the step never reads (``jax.jit`` drops
  unused arguments from the program, e.g. the frozen teacher's output layers when only its
  inner blocks' features are used, but the caller still holds them on the device: they count
  in the peak, as ``unread``);
* ``memory_analysis()``: argument, output, alias (donated), temp (activations, gradients,
  optimizer temporaries, gathered weights) and generated code, and their peak
  ``argument + unread + output - alias + temp + generated code``;
* ``cost_analysis()``: FLOPs and bytes accessed of the per-device program (a loop body is
  counted once: see ``CallStep.loops``);
* collectives, from the compiled HLO text: count and result bytes per op kind.

The temp figure is the CPU compiler's buffer assignment; an accelerator's compiler fuses
differently, so treat it as an estimate of the same order (docs/pod-scale.md says how it
compares with a measured run). Argument and output sizes are exact.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jdistill.models import layers
from jdistill.plan.steps import CallStep, TrainStep, abstract_value, as_abstract
from jdistill.train import mesh as mesh_lib
from jdistill.train import partitioning

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# element sizes of HLO types
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES)
                          + r")(?P<start>-start)?\(", re.MULTILINE)


def hlo_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (an array ``f32[72,4608]{1,0}`` or a tuple of them)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _HLO_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
    return int(total)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in a compiled HLO module's text; bytes are
    each op's result per device (an async ``-start`` op's result tuple holds its input and
    output buffers: its last element is counted)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for m in _INSTRUCTION.finditer(hlo_text):
        shape = m.group("shape")
        if m.group("start") and shape.startswith("("):
            arrays = _ARRAY.findall(shape)
            shape = f"{arrays[-1][0]}[{arrays[-1][1]}]" if arrays else shape
        out[m.group("op")]["count"] += 1
        out[m.group("op")]["bytes"] += hlo_bytes(shape)
    return out


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` laid out by ``shardings`` (a matching tree)."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = 0
    for x, s in zip(leaves, shs):
        shape = s.shard_shape(tuple(x.shape)) if len(x.shape) else ()
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def unread_arguments(lowered, args, shardings) -> dict[str, int]:
    """{leaf path: bytes one device holds} of the argument leaves ``jax.jit`` dropped from the
    program because the step never reads them (``keep_unused=False``, jit's default). They are
    not in XLA's ``argument_size_in_bytes``, yet the caller keeps them on the device."""
    # jit records which flat arguments it kept only on the lowering (no public accessor in JAX 0.10)
    kept = lowered._lowering.compile_args.get("kept_var_idx")
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    if kept is None or len(kept) == len(leaves):
        return {}
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return {jax.tree_util.keystr(path): shard_bytes([x], [s])
            for i, ((path, x), s) in enumerate(zip(leaves, shs)) if i not in kept}


def _count(tree) -> tuple[int, dict[str, int]]:
    """(number of elements, {dtype: elements}) of a param tree."""
    dtypes: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        n = int(np.prod(x.shape, dtype=np.int64))
        dtypes[str(np.dtype(x.dtype))] = dtypes.get(str(np.dtype(x.dtype)), 0) + n
    return sum(dtypes.values()), dtypes


def batch_shardings(batch, mesh) -> Any:
    """The leading axis of every batch leaf split over the data axes (replicated when they do not divide it)."""
    n = int(np.prod([mesh.shape[a] for a in mesh_lib.DATA_AXES]))

    def spec(x):
        if len(x.shape) == 0 or x.shape[0] % n:
            return NamedSharding(mesh, P())
        return mesh_lib.batch_sharding(mesh)

    return jax.tree.map(spec, batch)


def _train_layout(step: TrainStep, mesh, rules):
    """(jitted fn, abstract args, {kind: (tree, shardings)}, param trees) of a train step."""
    engine = step.engine
    params = abstract_value(step.init)
    state = jax.eval_shape(lambda p: engine.init(p, jax.random.key(int(step.seed))), params)
    frozen = as_abstract(step.frozen) if step.frozen is not None else None
    batch = as_abstract(step.batch)
    fn = engine.jit(mesh, state, frozen, rules=rules)
    st_sh = engine.shardings(state, mesh, rules)
    fr_sh = partitioning.shardings(frozen, mesh, rules) if frozen is not None else None
    kinds = {
        "params": ({k: p.params for k, p in state.parts.items()}, {k: p.params for k, p in st_sh.parts.items()}),
        "optimizer": ({k: (p.opt_state, p.count) for k, p in state.parts.items()},
                      {k: (p.opt_state, p.count) for k, p in st_sh.parts.items()}),
        "averages": (state.averages, st_sh.averages),
        "frozen": (frozen, fr_sh),
        "batch": (batch, jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh), batch)),
        "other": ((state.step, state.rng, state.skipped), (st_sh.step, st_sh.rng, st_sh.skipped)),
    }
    parts = {name: {"params": shard_bytes(state.parts[name].params, st_sh.parts[name].params),
                    "optimizer": shard_bytes((state.parts[name].opt_state, state.parts[name].count),
                                             (st_sh.parts[name].opt_state, st_sh.parts[name].count))}
             for name in state.parts}
    weights = {"trained": {k: p.params for k, p in state.parts.items()}, "frozen": frozen}
    return fn, (state, frozen, batch), (st_sh, fr_sh, kinds["batch"][1]), kinds, parts, weights


def _call_layout(step: CallStep, mesh, rules):
    params = as_abstract(step.params)
    batch = as_abstract(step.batch)
    p_sh = partitioning.shardings(params, mesh, rules)
    b_sh = batch_shardings(batch, mesh)
    fn = jax.jit(step.fn, in_shardings=(p_sh, b_sh))
    kinds = {"params": (params, p_sh), "batch": (batch, b_sh)}
    return fn, (params, batch), (p_sh, b_sh), kinds, {}, {"weights": params}


def analyse(step, mesh, rules=None) -> dict:
    """Compile ``step`` (a TrainStep or CallStep) for ``mesh`` and report it per device."""
    layout = _train_layout if isinstance(step, TrainStep) else _call_layout
    t0 = time.perf_counter()
    fn, args, arg_shardings, kinds, parts, weights = layout(step, mesh, rules)
    with layers.planning():
        lowered = fn.lower(*args)
    unread = unread_arguments(lowered, args, arg_shardings)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    memory = {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
              "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
              "generated_code": int(mem.generated_code_size_in_bytes),
              "unread": sum(unread.values())}
    memory["peak"] = memory["argument"] + memory["unread"] + memory["output"] - memory["alias"] + memory["temp"] + \
        memory["generated_code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    batch_leaves = jax.tree.leaves(args[-1])
    global_batch = int(batch_leaves[0].shape[0]) if batch_leaves and batch_leaves[0].shape else 0
    data_ways = int(np.prod([mesh.shape[a] for a in mesh_lib.DATA_AXES]))
    counts = {name: dict(zip(("count", "dtypes"), _count(tree))) for name, tree in weights.items() if tree is not None}
    return {
        "name": step.name, "kind": step.kind, "description": step.description,
        "bytes": {k: shard_bytes(tree, sh) if tree is not None else 0 for k, (tree, sh) in kinds.items()},
        "parts": parts, "param_counts": counts, "memory": memory, "unread": unread,
        "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "transcendentals": float(cost.get("transcendentals", 0.0)),
        "loops": dict(getattr(step, "loops", {}) or {}),
        "collectives": collectives(compiled.as_text()),
        "global_batch": global_batch, "batch_per_device": global_batch / data_ways if global_batch else 0,
        "lower_seconds": t1 - t0, "compile_seconds": t2 - t1,
        "options": module_options(step),
    }


def module_options(step) -> dict:
    """For each setting the step names (``param_dtype``, ``remat``, ...): its config key, whether
    every network involved has that option, and the values they have now."""
    out = {}
    for setting, key in step.settings.items():
        field = key.rsplit(".", 1)[-1]
        values = [getattr(m, field) for m in step.modules.values() if hasattr(m, field)]
        out[setting] = {"key": key, "available": bool(step.modules) and len(values) == len(step.modules),
                        "values": sorted({str(np.dtype(v)) if isinstance(v, (type, np.dtype)) else str(v)
                                          for v in values})}
    return out


__all__ = ["COLLECTIVES", "analyse", "collectives", "hlo_bytes", "shard_bytes"]
