"""The jdistill side of the benchmark: the project's train step and samplers on a converted model.

``jdistill_train_step`` is the one place that assembles a training step for the benchmark
from the project's parts (the denoising loss, ``optim.make_optimizer``, the jitted sharded
step of ``jdistill.train.engine``): when the train engine changes, this function is what follows it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.bench import devices
from jdistill.bench.specs import EXTRA_TASKS, ModelSpec, resolve
from jdistill.convert import registry
from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.diffusion.timesteps import make_grid
from jdistill.objectives.denoising import denoising_loss
from jdistill.sampling import samplers
from jdistill.train import engine as engine_lib
from jdistill.train import mesh as mesh_lib
from jdistill.train import optim
from jdistill.train import partitioning

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class TrainStep:
    """A compiled step ``state, batch -> state, metrics`` with its first state and a batch."""

    compiled: Any
    state: Any
    batch: dict
    compile_s: float

    def __call__(self):
        self.state, metrics = self.compiled(self.state, None, self.batch)
        return metrics


def jdistill_train_step(model, params, batch_shape, *, cond: dict | None = None, schedule=None,
                        prediction: str = "eps", lr: float = 1e-4, clip_norm: float | None = 1.0,
                        seed: int = 0) -> TrainStep:
    """The project's training step for ``model`` on batches of ``batch_shape`` (B, H, W, C):
    the denoising loss (plain MSE on the prediction target, no condition dropout), AdamW
    behind global-norm clipping, no EMA (the PyTorch loop it is compared with keeps none),
    compiled ahead of time on a one-device-or-more data mesh.

    ``cond``: the module's condition inputs as arrays with the batch leading (``class_labels``,
    ``encoder_hidden_states``, ...); they travel in the batch and reach the module unchanged.
    """
    cond = dict(cond or {})
    schedule = schedule if schedule is not None else schedules.DiscreteVP.from_betas("linear")
    template = Denoiser(params=None, schedule=schedule, module=model, prediction=prediction,
                        learned_variance=_learned_variance(model))
    keys = tuple(cond)
    loss_fn = denoising_loss(template, weighting="constant", cond_fn=lambda batch: {k: batch[k] for k in keys})
    tx, lr_schedule = optim.make_optimizer(lr, 1, clip_norm=clip_norm)
    engine = engine_lib.single(loss_fn, tx, lr_schedule)
    state = engine.init({"student": params}, jax.random.key(seed))
    mesh = mesh_lib.make_mesh()
    step = engine.jit(mesh, state)
    batch = dict(image=jax.random.normal(jax.random.key(seed + 1), batch_shape, jnp.float32), **cond)
    batch = partitioning.place(batch, jax.tree.map(lambda _: mesh_lib.batch_sharding(mesh), batch))
    state = partitioning.place(state, engine.shardings(state, mesh))
    start = time.perf_counter()
    compiled = step.lower(state, None, batch).compile()
    return TrainStep(compiled, state, batch, time.perf_counter() - start)


def _learned_variance(module) -> bool:
    out = getattr(module, "output_channels", None) or getattr(module, "out_channels", None)
    return bool(out and out == 2 * module.in_channels)


class JaxSide:
    """Worker-side state for one model: build, then time tasks on request."""

    def build(self, spec: dict, weights: str, dtype: str, seed: int = 0) -> dict:
        import safetensors.numpy

        self.spec = spec = ModelSpec(**spec)
        family = registry.get(spec.family).load()
        self.module = family.module_from_config(spec.config, dtype=DTYPES[dtype], param_dtype=jnp.float32)
        params = family.load_params(safetensors.numpy.load_file(weights), self.module)
        self.params = jax.tree.map(jnp.asarray, params)
        self.flow = spec.schedule == "flow"
        self.schedule = schedules.RectifiedFlow(shift=3.0) if self.flow else schedules.DiscreteVP.from_betas("linear")
        self.cond = conditions(spec, seed)
        b, s, c = spec.batch, spec.latent_hw, spec.channels
        # the step donates its state: it trains a copy, the samplers keep the converted weights
        self.train = jdistill_train_step(self.module, jax.tree.map(jnp.copy, self.params), (b, s, s, c), cond=self.cond,
                                         schedule=self.schedule, prediction="flow" if self.flow else "eps",
                                         seed=seed)
        compiled = self.train.compiled
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
        self.samplers: dict[str, Callable] = {}
        return dict(
            device=devices.describe(), params=int(sum(x.size for x in jax.tree.leaves(self.params))),
            train_compile_s=self.train.compile_s, train_flops=float((cost or {}).get("flops", 0.0)),
            train_compiled_bytes=None if mem is None else int(
                mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes))

    def prepare(self, task: str) -> dict:
        """Compile (and run once) what ``task`` times; returns its compile time."""
        start = time.perf_counter()
        if task == "train":
            jax.block_until_ready(self.train())
        else:
            fn = resolve(EXTRA_TASKS[task][0])(self) if task in EXTRA_TASKS else self._sampler(task)
            jax.block_until_ready(fn())
            self.samplers[task] = fn
        # the allocator keeps no per-task peak: this is the peak of everything run so far
        return dict(warmup_s=time.perf_counter() - start, peak_bytes=devices.peak_bytes())

    def time(self, task: str, n: int) -> list[tuple[float, float]]:
        fn = self.train if task == "train" else self.samplers[task]
        out = []
        for _ in range(n):
            start, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            out.append((time.perf_counter() - start, time.process_time() - cpu))
        return out

    def _sampler(self, task: str):
        spec = self.spec
        teacher = task == "teacher"
        steps = spec.teacher_steps if teacher else spec.student_steps
        solver = "euler" if self.flow else "ddim"
        grid = make_grid(self.schedule, steps, solver)
        null = NullClass(spec.num_classes) if spec.num_classes else None
        den = Denoiser(params=self.params, schedule=self.schedule, module=self.module,
                       prediction="flow" if self.flow else "eps", learned_variance=_learned_variance(self.module),
                       null_cond=null)
        noise = jax.random.normal(jax.random.key(7), (spec.batch, spec.latent_hw, spec.latent_hw, spec.channels))
        uncond = None if (null or not teacher) else jax.tree.map(jnp.zeros_like, self.cond)
        g = spec.guidance_scale if teacher else None
        return lambda: samplers.sample_jit(den, noise, self.cond, grid=grid, solver=solver, guidance_scale=g,
                                           uncond=uncond)


def conditions(spec: ModelSpec, seed: int) -> dict:
    """Condition inputs of the module (batch leading), drawn from ``seed``; the same draws on
    both sides would not change a timing, so each side draws its own."""
    rng = np.random.default_rng(seed)
    b = spec.batch
    if spec.num_classes:
        return dict(class_labels=jnp.asarray(rng.integers(0, spec.num_classes, b), jnp.int32))
    out = dict(encoder_hidden_states=jnp.asarray(rng.standard_normal((b, spec.text_tokens, spec.text_width)),
                                                 jnp.float32))
    if spec.pooled_width:
        out["pooled_projections"] = jnp.asarray(rng.standard_normal((b, spec.pooled_width)), jnp.float32)
    return out
