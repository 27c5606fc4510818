"""The jitted, sharded train step shared by every objective.

    step = make_train_step(loss_fn, optimizer, mesh=mesh, state=abstract_state, frozen=frozen)
    state, metrics = step(state, frozen, batch)

``loss_fn(params, frozen, batch, rng) -> (loss, metrics)`` is the objective
(``jdistill.objectives``); ``frozen`` carries what the objective reads but
does not train (teacher params, discriminator feature network). The step is
``jax.jit`` with explicit in/out shardings over the (data, fsdp) mesh, and
donates the incoming state so params and optimizer moments are updated in
place.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jdistill.train import mesh as mesh_lib
from jdistill.train.state import TrainState


def state_shardings(abstract_state: TrainState, mesh, rules=(), min_size: int = 2**14) -> TrainState:
    """Params, EMA and optimizer moments FSDP-split by the same rules; step and RNG replicated."""
    sh = mesh_lib.shardings(abstract_state, mesh, rules, min_size)
    rep = mesh_lib.replicated(mesh)
    return sh.replace(step=rep, rng=rep)


def apply_gradients(state: TrainState, grads, optimizer, ema_decay: float | None) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None and ema_decay is not None:
        ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def compiler_options(backend: str | None = None) -> dict | None:
    """XLA options for a training step on ``backend`` (default: JAX's default backend).

    On CPU: keep optimization barriers through fusion. XLA:CPU removes them before fusing
    (GPU and TPU keep them), and then ``models.layers.materialize_cotangent`` cannot stop the
    fusion pass from recomputing a residual stream's gradient in every consumer; with them
    kept, a DiT step ran 16% faster. It also makes ``jax.checkpoint`` keep its recomputation
    on CPU, as it does elsewhere.
    """
    if (backend or jax.default_backend()) == "cpu":
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return None


def make_train_step(loss_fn: Callable, optimizer, *, mesh, state: TrainState, frozen=None,
                    ema_decay: float | None = 0.999, lr_schedule=None, rules=(), min_size: int = 2**14,
                    donate: bool = True):
    """Compile-ready step ``(state, frozen, batch) -> (state, metrics)``.

    ``state`` / ``frozen`` may be concrete or abstract (``jax.eval_shape``); only
    their structure and shapes are read, to lay out the shardings.
    """
    st_sh = state_shardings(state, mesh, rules, min_size)
    frozen_sh = mesh_lib.shardings(frozen, mesh, rules, min_size) if frozen is not None else None
    batch_sh = mesh_lib.batch_sharding(mesh)
    rep = mesh_lib.replicated(mesh)

    def step(state: TrainState, frozen, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch,
                                                                           state.step_key())
        new_state = apply_gradients(state, grads, optimizer, ema_decay)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return new_state, metrics

    return jax.jit(step, in_shardings=(st_sh, frozen_sh, batch_sh), out_shardings=(st_sh, rep),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options())


def place(tree, shardings):
    """Put a host or device tree onto the given shardings (works across processes)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
                        if not isinstance(x, jax.Array) else jax.device_put(x, s), tree, shardings)


def sharded_init(init_fn: Callable, mesh, rules=(), min_size: int = 2**14):
    """Run ``init_fn()`` (returning a TrainState) straight into its shardings: each device
    materialises only its own shard, as MaxDiffusion does for big models."""
    abstract = jax.eval_shape(init_fn)
    sh = state_shardings(abstract, mesh, rules, min_size)
    return jax.jit(init_fn, out_shardings=sh)(), sh


__all__ = ["TrainState", "apply_gradients", "compiler_options", "make_train_step", "place", "sharded_init", "state_shardings",
           "NamedSharding", "P"]
