"""Would a differentiated CPU attention run faster in blocks of queries? Measured, not taken.

The einsum attention's backward (``layers.attention_einsum``) writes the (T, S) probabilities'
gradient and transposes out whole. A variant defined here keeps the undifferentiated call as it is
(sampling unchanged) and, under differentiation, runs the forward in blocks of queries with each
block's residuals of its own, summing the key and value gradients over the blocks. Two timings,
alternated rounds, medians, each against the library's one call:

* ``--part attention``: the attention alone, forward + backward, at the bench models' shapes;
* ``--part step``: a bench model's whole train step (``jdistill bench``'s), the variant swapped in.

    python bench/attention_query_blocks.py --part attention
    python bench/attention_query_blocks.py --part step --model sd3-mmdit-cpu
"""

import argparse

import numpy as np
from attention_chunking import alternated_medians, bench_module

SHAPES = {  # (B, T, heads, head width, S)
    "sd15-unet-cpu self-attention (32 x 32)": (4, 1024, 2, 16, 1024),
    "sd3-mmdit-cpu joint attention": (8, 333, 4, 32, 333),
    "8 x 256 tokens": (8, 256, 4, 32, 256),
    "dit-cpu": (32, 64, 4, 64, 64),
}


def blocked_attention(block_bytes: int):
    """``layers.attention_einsum`` with its differentiated forward in query blocks of at most
    ``block_bytes`` of float32 logits (multiples of 16 queries); one call below twice that."""
    import jax
    import jax.numpy as jnp

    from jdistill.models.layers import _attention_einsum_bwd, _attention_einsum_fwd

    def block_of(q, k):
        b, t, heads, _ = q.shape
        per_query = b * heads * k.shape[1] * 4
        return None if t * per_query <= 2 * block_bytes else max(16, block_bytes // per_query // 16 * 16)

    @jax.custom_vjp
    def attend(q, k, v, mask=None):
        return _attention_einsum_fwd(q, k, v, mask)[0]

    def fwd(q, k, v, mask):
        block = block_of(q, k)
        if block is None:
            out, res = _attention_einsum_fwd(q, k, v, mask)
            return out, (mask, (res,))
        t = q.shape[1]
        per_query_mask = mask is not None and mask.ndim == 4 and mask.shape[2] == t and t > 1
        outs, blocks = [], []
        for i in range(0, t, block):
            rows = slice(i, i + block)
            out, res = _attention_einsum_fwd(q[:, rows], k, v, mask[:, :, rows] if per_query_mask else mask)
            outs.append(out)
            blocks.append(res)
        return jnp.concatenate(outs, axis=1), (mask, tuple(blocks))

    def bwd(res, d_out):
        mask, blocks = res
        if len(blocks) == 1:
            return _attention_einsum_bwd(blocks[0], d_out)
        d_qs, d_k, d_v, start = [], 0.0, 0.0, 0
        for block in blocks:
            rows = block[0].shape[1]
            d_q, dk, dv, _ = _attention_einsum_bwd(block, d_out[:, start:start + rows])
            start += rows
            d_qs.append(d_q)
            d_k, d_v = d_k + dk, d_v + dv
        d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
        return jnp.concatenate(d_qs, axis=1), d_k, d_v, d_mask

    attend.defvjp(fwd, bwd)
    return attend


def attention_part(rounds: int, sizes_mib):
    import jax
    import jax.numpy as jnp

    from jdistill.models import layers

    print(f"attention forward + backward, ms (median of {rounds} alternated rounds); blocks of at most N MiB of logits")
    print("| shape (B, T, heads, width, S) | one call | " + " | ".join(f"{m:g} MiB blocks" for m in sizes_mib)
          + " | max relative gradient difference |")
    print("|---|---|" + "---|" * len(sizes_mib) + "---|")
    for name, (b, t, n, h, s) in SHAPES.items():
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((b, x, n, h)), jnp.float32) for x in (t, s, s))
        grads = {"one": jax.jit(jax.grad(lambda q, k, v: (layers.attention_einsum(q, k, v) ** 2).sum(), (0, 1, 2)))}
        for m in sizes_mib:
            att = blocked_attention(int(m * (1 << 20)))
            grads[m] = jax.jit(jax.grad(lambda q, k, v, att=att: (att(q, k, v) ** 2).sum(), (0, 1, 2)))
        ref = grads["one"](q, k, v)
        diff = max(float(np.abs(np.asarray(a) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
                   for m in sizes_mib for a, r in zip(grads[m](q, k, v), ref))
        med = alternated_medians({key: (lambda g=g: jax.block_until_ready(g(q, k, v))) for key, g in grads.items()},
                                 rounds)
        print(f"| {name} {(b, t, n, h, s)} | {1000 * med['one']:.2f} | "
              + " | ".join(f"{1000 * med[m]:.2f}" for m in sizes_mib) + f" | {diff:.1e} |")


def step_part(model: str, rounds: int, block_mib: float):
    import jax
    import jax.numpy as jnp

    from jdistill.bench.jax_side import conditions, jdistill_train_step
    from jdistill.diffusion import schedules
    from jdistill.models import layers

    spec, module, params = bench_module(model)
    flow = spec.schedule == "flow"
    schedule = schedules.RectifiedFlow(shift=3.0) if flow else schedules.DiscreteVP.from_betas("linear")
    library = layers.attention_einsum
    steps = {}
    for mode in ("one call", "query blocks"):  # traced and compiled with this mode's attention
        layers.attention_einsum = library if mode == "one call" else blocked_attention(int(block_mib * (1 << 20)))
        try:
            steps[mode] = jdistill_train_step(module, jax.tree.map(jnp.copy, params),
                                              (spec.batch, spec.latent_hw, spec.latent_hw, spec.channels),
                                              cond=conditions(spec, 0), schedule=schedule,
                                              prediction="flow" if flow else "eps")
        finally:
            layers.attention_einsum = library
        jax.block_until_ready(steps[mode]())
    med = alternated_medians({m: (lambda s=s: jax.block_until_ready(s())) for m, s in steps.items()}, rounds)
    print(f"{model}: train step (batch {spec.batch}), s (median of {rounds} alternated rounds), "
          f"blocks of at most {block_mib:g} MiB of logits")
    print("| attention | s / step | compile s |")
    print("|---|---|---|")
    for m, step in steps.items():
        print(f"| {m} | {med[m]:.3f} | {step.compile_s:.1f} |")
    print(f"query blocks / one call: {med['query blocks'] / med['one call']:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["attention", "step"], default="attention")
    ap.add_argument("--model", default="sd3-mmdit-cpu")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block-mib", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    args = ap.parse_args()
    if args.part == "attention":
        attention_part(args.rounds, args.block_mib)
    else:
        step_part(args.model, args.rounds, args.block_mib[0] if len(args.block_mib) == 1 else 2.0)


if __name__ == "__main__":
    main()
