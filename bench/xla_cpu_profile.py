"""Where a bench model's time goes on XLA:CPU, and how its matrix products compare with PyTorch's.

    python bench/xla_cpu_profile.py --model sd3-mmdit-cpu --task train     # thunk times by kind, top thunks
    python bench/xla_cpu_profile.py --model dit-cpu --task forward --top 10
    python bench/xla_cpu_profile.py --gemm --model dit-cpu --threads 1     # the model's linear-layer GEMMs, JAX vs torch

Profile: the bench's model (random init, its batch) compiled as ``jdistill bench`` compiles it (the
forward alone, or the train step of ``bench.jax_side``), traced with XLA:CPU's per-thunk TraceMe
events (``--xla_cpu_enable_xprof_traceme``); each thunk's time summed over ``--calls`` calls, over
both worker threads (so the total is CPU time, not wall time), grouped by kind: YNNPACK fusions that
hold an attention's (T, S) scores, other YNNPACK fusions (the linear layers' GEMMs, convolutions),
XLA loop fusions, materialised broadcasts, transposes and copies.

``--gemm``: every (M, K, N) product of the model's linear layers at the bench batch, ``x @ w`` in
JAX (jitted) and in PyTorch, rounds alternated, medians, GFLOP/s. A model whose time is in these
GEMMs can only beat PyTorch by as much as XLA's GEMMs beat its BLAS.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time


def _flags(threads: int):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    if threads == 1:  # as `jdistill bench --single-thread`
        flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags


def build(name: str, task: str):
    import jax
    import jax.numpy as jnp

    from jdistill.bench.jax_side import conditions, jdistill_train_step
    from jdistill.bench.specs import MODELS
    from jdistill.convert import registry
    from jdistill.diffusion import schedules

    spec = MODELS[name]
    module = registry.get(spec.family).load().module_from_config(spec.config, dtype=jnp.float32,
                                                                 param_dtype=jnp.float32)
    b, s, c = spec.batch, spec.latent_hw, spec.channels
    cond = conditions(spec, 0)
    x, t = jax.random.normal(jax.random.key(1), (b, s, s, c)), jnp.full((b,), 500.0)
    params = module.init(jax.random.key(0), x, t, **cond)["params"]
    if task == "forward":
        compiled = jax.jit(lambda p, x, t, cond: module.apply({"params": p}, x, t, **cond)).lower(
            params, x, t, cond).compile()
        return compiled, lambda: compiled(params, x, t, cond)
    flow = spec.schedule == "flow"
    schedule = schedules.RectifiedFlow(shift=3.0) if flow else schedules.DiscreteVP.from_betas("linear")
    step = jdistill_train_step(module, params, (b, s, s, c), cond=cond, schedule=schedule,
                               prediction="flow" if flow else "eps")
    return step.compiled, step


def kind(name: str, line: str, hlo: str) -> str:
    """The thunk's kind, from its HLO line and, for a fusion, the einsum / op names in its body."""
    body = ""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
        start = hlo.find(f"\n%{called.group(1)} ")
        body = hlo[start:hlo.find("\n}", start)] if start >= 0 else ""
    if name.startswith("ynn"):
        if "bnts" in body:  # layers.attention_einsum's (T, S) scores
            return "YNNPACK, attention"
        return "YNNPACK, convolution" if " convolution(" in body else "YNNPACK, GEMM"
    if name.startswith("wrapped_broadcast"):  # a broadcast written out whole (a YNNPACK fusion's operand)
        return "materialised broadcast"
    if name.startswith(("transpose", "copy", "wrapped_transpose", "wrapped_copy")):
        return "transpose / copy"
    if "Await" in name:
        return "thread-pool wait"
    return "XLA loop fusion / other"


def profile(args):
    import jax
    from jax._src.lib import _profile_data

    compiled, call = build(args.model, args.task)
    hlo = compiled.as_text()
    for _ in range(2):
        jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(args.calls):
                jax.block_until_ready(call())
        data = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        totals = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if line.name != "python" and not ev.name.startswith("ThunkExecutor"):
                        totals[ev.name] += ev.duration_ns / args.calls / 1e6
    lines = {}
    for name in totals:
        m = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(name) + r" = ([^\n]*)", hlo)
        lines[name] = m.group(1) if m else ""
    shapes = {name: line.split(" ")[0] for name, line in lines.items()}
    by_kind = collections.Counter()
    for name, ms in totals.items():
        by_kind[kind(name, lines[name], hlo)] += ms
    total = sum(totals.values())
    print(f"{args.model} {args.task}: {total:.1f} ms of thunk time a call (both threads)\n")
    print("| kind | ms / call | share |\n|---|---|---|")
    for k, ms in by_kind.most_common():
        print(f"| {k} | {ms:.1f} | {ms / total:.0%} |")
    print(f"\n| thunk | result | ms / call |\n|---|---|---|")
    for name, ms in totals.most_common(args.top):
        print(f"| {name} | {shapes[name]} | {ms:.2f} |")


def gemm_shapes(name: str):
    """{(M, K, N): count} of the 2-D products (the linear layers: ``layers.dense`` computes on (B*T, C))
    in the model's lowered forward at the bench batch."""
    import jax
    import jax.numpy as jnp

    from jdistill.bench.jax_side import conditions
    from jdistill.bench.specs import MODELS
    from jdistill.convert import registry

    spec = MODELS[name]
    module = registry.get(spec.family).load().module_from_config(spec.config, dtype=jnp.float32,
                                                                 param_dtype=jnp.float32)
    b, s, c = spec.batch, spec.latent_hw, spec.channels
    cond = conditions(spec, 0)
    x, t = jnp.zeros((b, s, s, c)), jnp.full((b,), 500.0)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, **cond)["params"])
    text = jax.jit(lambda p: module.apply({"params": p}, x, t, **cond)).lower(params).as_text()
    pattern = r"dot_general[^\n]*\(tensor<(\d+)x(\d+)xf32>, tensor<(\d+)x(\d+)xf32>\) -> tensor<\d+x\d+xf32>"
    # products over tokens only: the (B, C) ones of the conditioning MLPs are fused into their
    # neighbours in the compiled model, and alone they would time a call's dispatch
    return collections.Counter((int(m), int(k), int(n)) for m, k, _, n in re.findall(pattern, text) if int(m) >= 64)


def gemm(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{args.model}: its linear layers' GEMMs, {args.rounds} alternated rounds, medians "
          f"({args.threads or 'default'} thread(s))\n")
    print("| M x K x N | count | JAX ms | torch ms | JAX GFLOP/s | torch GFLOP/s | JAX time / torch |\n"
          "|---|---|---|---|---|---|---|")
    tot_j = tot_t = 0.0
    for (m, k, n), count in sorted(gemm_shapes(args.model).items()):
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        f = jax.jit(jnp.matmul)
        runs = {"jax": lambda: f(ja, jb).block_until_ready(), "torch": lambda: torch.matmul(ta, tb)}
        times = {key: [] for key in runs}
        for r in range(args.rounds + 2):
            for key in (list(runs) if r % 2 else list(runs)[::-1]):
                start = time.perf_counter()
                for _ in range(5):
                    runs[key]()
                if r >= 2:
                    times[key].append((time.perf_counter() - start) / 5 * 1e3)
        tj, tt = float(np.median(times["jax"])), float(np.median(times["torch"]))
        tot_j, tot_t = tot_j + count * tj, tot_t + count * tt
        gf = 2 * m * k * n / 1e6
        print(f"| {m} x {k} x {n} | {count} | {tj:.3f} | {tt:.3f} | {gf / tj:.0f} | {gf / tt:.0f} | {tj / tt:.2f}x |")
    print(f"| all, weighted by count | | {tot_j:.2f} | {tot_t:.2f} | | | {tot_j / tot_t:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sd3-mmdit-cpu")
    ap.add_argument("--task", choices=("forward", "train"), default="train")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--gemm", action="store_true", help="time the model's linear-layer GEMMs in JAX and PyTorch")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="1: both frameworks on one thread")
    args = ap.parse_args()
    _flags(args.threads)
    (gemm if args.gemm else profile)(args)


if __name__ == "__main__":
    sys.exit(main())
