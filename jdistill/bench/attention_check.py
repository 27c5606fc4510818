"""Which attention kernel jdistill picks on this machine, and whether it agrees with XLA's.

    python -m jdistill.bench.attention_check

At DiT-XL/2's and SD1.5's attention shapes in bf16 (where cuDNN's flash kernel applies on
NVIDIA GPUs): the chosen implementation, the einsum path and ``jax.nn.dot_product_attention``'s
XLA path, on the same inputs; exits non-zero if any differs from XLA's by more than bf16
rounding allows. bench/gpu.sh runs it; tests/test_attention.py holds the same check.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from jdistill.models import layers

# (batch, query tokens, key tokens, heads, head width): DiT-XL/2 at 256 px; SD1.5's first
# level, self- and cross-attention
SHAPES = ((8, 256, 256, 16, 72), (2, 4096, 4096, 8, 40), (2, 4096, 77, 8, 40))
TOLERANCE = 3e-2  # bf16 inputs and outputs: a few units in the last of 8 mantissa bits


def main() -> int:
    worst = 0.0
    for b, t, s, n, h in SHAPES:
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (b, length, n, h), jnp.bfloat16) for key, length in zip(ks, (t, s, s)))
        chosen = layers.attention_implementation(q, k, v)
        outs = {impl: jax.jit(lambda q, k, v, impl=impl: layers.attention(q, k, v, implementation=impl))(q, k, v)
                for impl in dict.fromkeys(("xla", "einsum", chosen))}
        diff = max(float(jnp.max(jnp.abs(o.astype(jnp.float32) - outs["xla"].astype(jnp.float32))))
                   for o in outs.values())
        worst = max(worst, diff)
        print(f"T={t} S={s} heads={n} width={h} on {jax.default_backend()}: picks {chosen}; "
              f"max |difference| to xla over {sorted(outs)}: {diff:.3g}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
