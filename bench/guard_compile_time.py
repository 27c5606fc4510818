"""Compile time of the engine's update guard as a function of the param tree's leaf count (XLA:CPU).

    python bench/guard_compile_time.py 400 select_allfinite   # a per-leaf isfinite stack in the predicate: ~50 s
    python bench/guard_compile_time.py 400 select_both        # the norms alone (what the engine checks): ~3 s

Found while the SD UNet's train step (about 700 leaves) did not compile in 8 minutes: the
per-leaf ``all(isfinite)`` stacked into the select's predicate grew quadratically with the leaves
(100: 5.5 s, 200: 12.9 s, 400: 46 s); the float32 norm of the new params already refuses any NaN
or inf, so the engine checks only the norms.
"""
import sys, time
import jax, jax.numpy as jnp, optax, numpy as np
n = int(sys.argv[1]); mode = sys.argv[2]
rng = np.random.default_rng(0)
shapes = [tuple(int(d) for d in rng.choice([3, 32, 64, 128], size=rng.integers(1, 4))) for _ in range(n)]
tree = {f"p{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
def f(p, g):
    new = jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)
    if mode == "plain":
        return new
    if mode == "norms":
        return new, optax.global_norm(g), optax.global_norm(new)
    if mode == "allfinite":
        return new, jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    if mode == "select_norm":
        ok = jnp.isfinite(optax.global_norm(g))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "select_newnorm":
        ok = jnp.isfinite(optax.global_norm(new))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "select_newnorm_barrier":
        new = jax.lax.optimization_barrier(new)
        ok = jnp.isfinite(optax.global_norm(new))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "guard_barrier":
        new = jax.lax.optimization_barrier(new)
        ok = jnp.isfinite(optax.global_norm(g)) & jnp.isfinite(optax.global_norm(new))
        ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "select_both":
        ok = jnp.isfinite(optax.global_norm(g)) & jnp.isfinite(optax.global_norm(new))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "select_new_allfinite":
        ok = jnp.isfinite(optax.global_norm(new)) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "select_allfinite":
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    if mode == "select_ext":
        ok = jnp.isfinite(g["p0"][..., :1].sum())
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
    ok = jnp.isfinite(optax.global_norm(g)) & jnp.isfinite(optax.global_norm(new))
    ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
from jdistill.train.engine import compiler_options
low = jax.jit(f, compiler_options=compiler_options() if "barrier" in mode else None).lower(tree, tree)
t0 = time.perf_counter(); low.compile(); print(f"n={n} {mode} compile {time.perf_counter()-t0:.1f}s")
