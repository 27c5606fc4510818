"""The CPU einsum attention's batch chunking (``layers.EINSUM_LOGITS_BYTES``) on a bench model's
forward, jdistill only: one call for the whole batch ("off") against chunks of at most 16 MiB of
logits ("on"), at the bench batch B and at 2B (a CFG batch), alternated, medians.

    python bench/attention_chunking.py --model sd15-unet-cpu
    python bench/attention_chunking.py --model sd3-mmdit-cpu
"""

import argparse
import time

import numpy as np


def bench_module(name: str, seed: int = 0):
    """(spec, Flax module, random params at 0.02 std) of a ``jdistill bench`` model, fp32."""
    import jax
    import jax.numpy as jnp

    from jdistill.bench.specs import MODELS
    from jdistill.convert import registry
    from jdistill.convert.engine import abstract_params
    from jdistill.models import registry as model_registry

    spec = MODELS[name]
    module = registry.get(spec.family).load().module_from_config(spec.config, dtype=jnp.float32,
                                                                  param_dtype=jnp.float32)
    ex_args, ex_kwargs = model_registry.example_inputs(module)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.02, a.dtype),
                          abstract_params(module, *ex_args, **ex_kwargs))
    return spec, module, params


def alternated_medians(calls: dict, rounds: int) -> dict:
    """Median seconds of each call, over ``rounds`` rounds whose order reverses every round."""
    times = {k: [] for k in calls}
    for r in range(rounds):
        for k, fn in (list(calls.items()) if r % 2 == 0 else list(reversed(calls.items()))):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15-unet-cpu")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from jdistill.bench.jax_side import conditions
    from jdistill.models import layers

    spec, module, params = bench_module(args.model)
    rng = np.random.default_rng(1)
    bound = layers.EINSUM_LOGITS_BYTES
    calls = {}
    for mode in ("off", "on"):
        layers.EINSUM_LOGITS_BYTES = 1 << 60 if mode == "off" else bound
        for b in (spec.batch, 2 * spec.batch):  # traced now, under this mode's bound
            cond = {k: jnp.concatenate([v] * (b // spec.batch)) for k, v in conditions(spec, 0).items()}
            x = jnp.asarray(rng.standard_normal((b, spec.latent_hw, spec.latent_hw, spec.channels)), jnp.float32)
            t = jnp.full((b,), 500.0)
            fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, **c))
            jax.block_until_ready(fn(params, x, t, cond))
            calls[(mode, b)] = (lambda fn=fn, x=x, t=t, c=cond: jax.block_until_ready(fn(params, x, t, c)))
    layers.EINSUM_LOGITS_BYTES = bound
    med = alternated_medians(calls, args.rounds)
    print(f"{args.model}: forward, ms (median of {args.rounds})")
    print("| batch | one call | chunked | chunked / one call |")
    print("|---|---|---|---|")
    for b in (spec.batch, 2 * spec.batch):
        off, on = (1000 * med[(m, b)] for m in ("off", "on"))
        print(f"| {b} | {off:.1f} | {on:.1f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
