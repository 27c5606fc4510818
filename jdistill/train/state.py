"""Train state and optimizer.

The state holds everything a bit-exact resume needs: step, params,
optimizer state, EMA params and the base RNG key (stored as raw key data
so Orbax can write it). The per-step key is ``fold_in(rng, step)``, so the
randomness of step k does not depend on how the run got to step k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # raw key data (uint32), see jax.random.key_data

    def step_key(self):
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def learning_rate_schedule(lr: float, steps: int, warmup: int = 0, decay: str = "constant", end_factor: float = 0.0):
    """Linear warmup into constant, linear or cosine decay (optax schedules)."""
    if decay == "constant":
        main = optax.constant_schedule(lr)
    elif decay == "linear":
        main = optax.linear_schedule(lr, lr * end_factor, max(steps - warmup, 1))
    elif decay == "cosine":
        main = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=end_factor)
    else:
        raise ValueError(f"unknown lr decay {decay!r}; expected constant, linear or cosine")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(lr: float, steps: int, *, warmup: int = 0, decay: str = "constant", end_factor: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, trainable_mask=None):
    """AdamW behind global-norm clipping; returns (optimizer, lr schedule).

    ``trainable_mask``: a pytree of bools (or a function of params giving one);
    params marked False get no update at all (frozen backbone, PE-CoDi).
    """
    schedule = learning_rate_schedule(lr, steps, warmup, decay, end_factor)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*chain)
    if trainable_mask is not None:
        tx = optax.multi_transform({True: tx, False: optax.set_to_zero()},
                                   trainable_mask if callable(trainable_mask) else lambda _: trainable_mask)
    return tx, schedule


def init_state(params, optimizer, rng, ema: bool = True) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
    )
