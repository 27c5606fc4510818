"""The train state: named parts, parameter averages, the step, the RNG.

    TrainState(step, parts={"student": PartState(params, opt_state, count)},
               averages={"ema": params-like tree, "target": ...}, rng, skipped)

It holds everything a bit-exact resume needs. A *part* is something with its own
optimizer (a student, a discriminator, an adapter); ``count`` is how many updates it
has received (a generator updated every second step has count = step / 2). An
*average* is a running average of one part's params with its own decay schedule (the
evaluation EMA, the consistency target theta^-). ``skipped`` counts updates the
non-finite guard refused. The per-step key is ``fold_in(rng, step)``, so the randomness
of step k does not depend on how the run got to step k.

When a part trains only some of its params (a frozen backbone under an adapter), the
frozen leaves are ``None`` in its optimizer state: they have no moments at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class PartState:
    params: Any
    opt_state: Any
    count: jax.Array  # updates applied to this part (int32)


@struct.dataclass
class TrainState:
    step: jax.Array
    parts: dict[str, PartState]
    averages: dict[str, Any]
    rng: jax.Array  # raw key data (uint32), see jax.random.key_data
    skipped: jax.Array  # updates refused by the non-finite guard (int32)

    def step_key(self):
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def params(self, part: str = "student"):
        return self.parts[part].params

    def count(self, part: str = "student"):
        return self.parts[part].count


def raw_key(rng) -> jax.Array:
    """Key data Orbax can write (a typed key becomes its uint32 words)."""
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def zero_count() -> jax.Array:
    return jnp.zeros((), jnp.int32)
