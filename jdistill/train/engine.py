"""The train engine: a step over named parts, built from update functions.

    engine = Engine(
        parts={"student": Part(optimizer, lr_schedule)},
        updates=[Update("student", loss_fn)],
        averages={"ema": Average("student", decay=0.999)})
    state = engine.init({"student": params}, jax.random.key(0))
    step = engine.jit(mesh, state, frozen)
    state, metrics = step(state, frozen, batch)

A *part* is a trainable param tree with its own optimizer (own lr schedule, clipping,
weight decay) and an optional ``trainable`` mask: masked-out leaves are split off before
differentiation, so they get no gradient, no optimizer moments and stay bit-identical
(a frozen backbone under an adapter). An *average* is a running average of one part's
trainable params with its own decay (a constant or a function of the part's update
count): the evaluation EMA, the consistency target theta^-.

An :class:`Update` is one gradient step of one part on one loss. Its loss reads what
``inputs(state, frozen)`` returns, computed from the state *inside* the jitted step, so a
target network or a discriminator is always read as it is now, never as it was when the
step was traced (the reference CoDi code's bug). A step runs its updates in order
(discriminator, then generator), the ``every``-th ones only on steps where
``step % every == 0``, all in one jitted call. The first update sees the step's key; the
i-th ``fold_in(key, i)``.

Every update passes the non-finite guard: when its loss, gradient norm or new params are
not all finite, or the update diverges (the new params' float32 norm overflows, or the update
is larger than ``Part.max_update_ratio`` times the part's own norm), the part and its averages
keep their old values and ``state.skipped`` grows. No host sync: the loop reads the counter
where it already syncs (logging and checkpoints) and applies the configured policy (skip on,
or stop).

Mixed precision is a part's module's business, not the optimizer's: a module built with
``dtype=bfloat16, param_dtype=float32`` computes in bf16 while its params, hence the
gradients the engine takes and the optimizer moments, stay float32 (master weights). Each
part has its own module, so each chooses (a bf16 student beside an fp32 discriminator);
``docs/performance.md`` states the tolerance against fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jdistill.models import layers
from jdistill.train import mesh as mesh_lib
from jdistill.train import partitioning
from jdistill.train.state import PartState, TrainState, raw_key, zero_count
from jdistill.train.trees import combine, split

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


MAX_UPDATE_RATIO = 100.0


@dataclasses.dataclass(frozen=True)
class Part:
    optimizer: optax.GradientTransformation
    lr_schedule: Callable | None = None
    # None: every param trains; else a tree of bools shaped like the params, or params -> such a tree
    trainable: Any = None
    # an update whose norm exceeds this many times the part's norm (at least 1) is refused as divergent:
    # far beyond any sane step (lr 1e-4..1e-2 moves a part by ~1e-3 of its norm), far below a runaway
    # lr's (1e6 under clipping moves every param by ~1e6, finite checkpoints that are useless). None: off
    max_update_ratio: float | None = MAX_UPDATE_RATIO


@dataclasses.dataclass(frozen=True)
class Average:
    of: str  # the part whose trainable params are averaged
    decay: float | Callable[[jax.Array], jax.Array]  # constant, or of the part's update count


def read_frozen(state, frozen):
    return frozen


@dataclasses.dataclass(frozen=True)
class Update:
    part: str
    loss: LossFn  # (params, inputs, batch, rng) -> (loss, metrics)
    inputs: Callable[[TrainState, Any], Any] = read_frozen  # what the loss reads besides its params
    every: int = 1


def compiler_options(backend: str | None = None) -> dict | None:
    """XLA options for a training step on ``backend`` (default: JAX's default backend).

    On CPU: keep optimization barriers through fusion. XLA:CPU removes them before fusing
    (GPU and TPU keep them), and then ``models.layers.materialize_cotangent`` cannot stop the
    fusion pass from recomputing a residual stream's gradient in every consumer; with them
    kept, a DiT step ran 16% faster. It also makes ``jax.checkpoint`` keep its recomputation
    on CPU, as it does elsewhere.
    """
    if (backend or jax.default_backend()) == "cpu" and not layers.reference_kernels():
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return None


def _norm32(tree) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree))


def _select(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class Engine:
    def __init__(self, parts: dict[str, Part], updates: Sequence[Update], averages: dict[str, Average] | None = None):
        self.parts = dict(parts)
        self.updates = tuple(updates)
        self.averages = dict(averages or {})
        for u in self.updates:
            if u.part not in self.parts:
                raise ValueError(f"update of unknown part {u.part!r}; parts: {sorted(self.parts)}")
            if int(u.every) < 1:
                raise ValueError(f"update of {u.part!r}: every must be >= 1, got {u.every}")
        for name, avg in self.averages.items():
            if avg.of not in self.parts:
                raise ValueError(f"average {name!r} of unknown part {avg.of!r}; parts: {sorted(self.parts)}")

    def with_max_update_ratio(self, ratio: float | None) -> "Engine":
        """The same engine with every part's divergence threshold set to ``ratio`` (None: off)."""
        parts = {name: dataclasses.replace(part, max_update_ratio=ratio) for name, part in self.parts.items()}
        return Engine(parts, self.updates, self.averages)

    # -- state -------------------------------------------------------------------------
    def init(self, params: dict[str, Any], rng) -> TrainState:
        missing = set(self.parts) - set(params)
        if missing:
            raise ValueError(f"no initial params for part(s) {sorted(missing)}")
        parts = {}
        for name, part in self.parts.items():
            trainable, _ = split(params[name], part.trainable)
            parts[name] = PartState(params[name], part.optimizer.init(trainable), zero_count())
        averages = {name: jax.tree.map(jnp.copy, split(params[avg.of], self.parts[avg.of].trainable)[0])
                    for name, avg in self.averages.items()}
        return TrainState(step=jnp.zeros((), jnp.int32), parts=parts, averages=averages, rng=raw_key(rng),
                          skipped=jnp.zeros((), jnp.int32))

    def average_params(self, state: TrainState, name: str):
        """Average ``name`` as a full param tree (the part's frozen leaves filled in)."""
        of = self.averages[name].of
        _, fixed = split(state.parts[of].params, self.parts[of].trainable)
        return combine(state.averages[name], fixed)

    # -- one update --------------------------------------------------------------------
    def apply_gradients(self, state: TrainState, name: str, grads, loss=None) -> tuple[TrainState, dict]:
        """Optimizer update of part ``name`` with ``grads`` (over its trainable params), its
        averages updated on their own decays, all behind the non-finite guard."""
        part, old = self.parts[name], state.parts[name]
        trainable, fixed = split(old.params, part.trainable)
        updates, opt_state = part.optimizer.update(grads, old.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.global_norm(grads)
        # a NaN or inf anywhere makes the float32 norm non-finite, and so do finite params whose squared
        # norm overflows (|w| ~ 1e19 and up: diverged all the same, the next forward pass overflows): one
        # check refuses both, before a checkpoint keeps them. (A per-leaf isfinite reduction stacked into
        # the same predicate made XLA:CPU's compile time quadratic in the leaf count: an SD UNet's step
        # did not compile in 8 minutes.)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(_norm32(new_trainable))
        if part.max_update_ratio is not None:
            ok = ok & (_norm32(updates) <= part.max_update_ratio * jnp.maximum(_norm32(trainable), 1.0))
        if loss is not None:
            ok = ok & jnp.isfinite(loss)
        new = PartState(combine(new_trainable, fixed), opt_state, old.count + 1)
        averages = dict(state.averages)
        for avg_name, avg in self.averages.items():
            if avg.of != name:
                continue
            decay = avg.decay(old.count) if callable(avg.decay) else avg.decay
            updated = optax.incremental_update(new_trainable, state.averages[avg_name], step_size=1.0 - decay)
            averages[avg_name] = _select(ok, updated, state.averages[avg_name])
        parts = dict(state.parts, **{name: _select(ok, new, old)})
        metrics = {"grad_norm": grad_norm}
        if part.lr_schedule is not None:
            metrics["lr"] = jnp.asarray(part.lr_schedule(old.count), jnp.float32)
        state = state.replace(parts=parts, averages=averages, skipped=state.skipped + (~ok).astype(jnp.int32))
        return state, metrics

    def _run(self, update: Update, state: TrainState, frozen, batch, rng):
        part = self.parts[update.part]
        trainable, fixed = split(state.parts[update.part].params, part.trainable)
        inputs = update.inputs(state, frozen)

        def loss_of(p):
            return update.loss(combine(p, fixed), inputs, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        state, extra = self.apply_gradients(state, update.part, grads, loss)
        return state, dict(metrics, loss=loss, **extra)

    # -- one step ----------------------------------------------------------------------
    def step(self, state: TrainState, frozen, batch) -> tuple[TrainState, dict]:
        """Every update in order, then ``step + 1``; pure (jit it with :meth:`jit`)."""
        key = state.step_key()
        metrics = {}
        prefixed = len(self.parts) > 1
        for i, update in enumerate(self.updates):
            rng = key if i == 0 else jax.random.fold_in(key, i)
            if update.every == 1:
                state, m = self._run(update, state, frozen, batch, rng)
            else:
                def run(s, update=update, rng=rng):
                    s, m = self._run(update, s, frozen, batch, rng)
                    return s, dict(m, updated=jnp.ones((), jnp.float32))

                shapes = jax.eval_shape(run, state)[1]

                def skip(s, shapes=shapes):
                    return s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

                state, m = jax.lax.cond(state.step % update.every == 0, run, skip, state)
            metrics.update({f"{update.part}/{k}" if prefixed else k: v for k, v in m.items()})
        metrics["nonfinite_skipped"] = state.skipped
        return state.replace(step=state.step + 1), metrics

    # -- compiled ----------------------------------------------------------------------
    def shardings(self, state, mesh, rules=None, min_size: int = partitioning.MIN_SIZE):
        return partitioning.state_shardings(state, mesh, rules, min_size=min_size)

    def jit(self, mesh, state, frozen=None, *, rules=None, donate: bool = True, min_size: int = partitioning.MIN_SIZE):
        """``jax.jit`` of :meth:`step` with explicit shardings: params, optimizer moments and
        averages laid out by the logical-axis ``rules``, the batch split over the data axes,
        the incoming state donated, compiled with :func:`compiler_options`. ``state`` /
        ``frozen`` may be abstract (eval_shape)."""
        st_sh = self.shardings(state, mesh, rules, min_size)
        frozen_sh = partitioning.shardings(frozen, mesh, rules, min_size=min_size) if frozen is not None else None
        def step(state, frozen, batch):
            with partitioning.activation_layout(mesh, rules):  # entered while jit traces
                return self.step(state, frozen, batch)

        return jax.jit(step, in_shardings=(st_sh, frozen_sh, mesh_lib.batch_sharding(mesh)),
                       out_shardings=(st_sh, mesh_lib.replicated(mesh)), donate_argnums=(0,) if donate else (),
                       compiler_options=compiler_options())


def single(loss_fn: LossFn, optimizer, lr_schedule=None, *, part: str = "student", trainable=None,
           ema_decay: float | None = None, inputs: Callable = read_frozen) -> Engine:
    """The common case: one part trained on one loss, with an evaluation EMA when ``ema_decay``."""
    averages = {"ema": Average(part, float(ema_decay))} if ema_decay else {}
    return Engine({part: Part(optimizer, lr_schedule, trainable)}, [Update(part, loss_fn, inputs)], averages)


def final_params(engine: Engine, state: TrainState, part: str = "student", average: str | None = "ema"):
    """The params to sample with: the average ``average`` when the engine keeps one, else the part's own."""
    if average and average in engine.averages:
        return engine.average_params(state, average)
    return state.parts[part].params
