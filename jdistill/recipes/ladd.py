"""LADD (Sauer et al., 2024): adversarial distillation with the frozen teacher as the discriminator's
feature network, trained on the teacher's own (synthetic) samples.

    jdistill synth   --config configs/digits_ladd.py          (teacher samples with CFG, once)
    jdistill distill --config configs/digits_ladd.py --workdir runs/digits_ladd
    jdistill sample  --workdir runs/digits_ladd --steps 4
    jdistill ladd-table --workdir runs/digits_ladd --out runs/ladd_table

One stage, two parts of the engine: ``student`` (the teacher's network, started from its params)
and ``discriminator`` (heads on the teacher's tapped block tokens, ``models/discriminator.py``),
each with its own optimizer, lr schedule and clipping (``student.optim``,
``discriminator.optim``), updated every ``ladd.d_every`` / ``ladd.g_every`` steps; the
discriminator goes first, so the generator reads it as it is after this step's update. The
teacher's params are the stage's ``frozen`` input and never change. ``distill`` generates the
synthetic data first when they are missing (``recipes/synth.py``). The student samples
unguided: x_hat, then re-noised along the flow to the next time (solver "renoise") on the
grid t = 1, (N - 1) / N, ..., 1 / N, moved by ``ladd.time_shift`` as the training times are.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jdistill import config as config_lib
from jdistill.diffusion.schedules import shift_time
from jdistill.diffusion.timesteps import unit_grid
from jdistill.errors import InvalidArgument
from jdistill.models import mmdit, registry
from jdistill.models.discriminator import Discriminator
from jdistill.objectives.ladd import LADD, discriminator_cond
from jdistill.recipes import Recipe, common, runs, stages, synth, tasks
from jdistill.recipes.evaluation import Sampler
from jdistill.recipes.members import Member, run_name
from jdistill.sampling import samplers
from jdistill.train import engine as engine_lib
from jdistill.train import optim

PART, DISC = "student", "discriminator"
SOLVER = "renoise"
# what the params depend on: resuming with other values is refused
IDENTITY_SECTIONS = ("teacher", "synth", "discriminator")


def discriminator_module(cfg, teacher) -> Discriminator:
    d = cfg.discriminator
    blocks = tuple(f"block_{b}" if isinstance(b, int) else str(b) for b in d.blocks)
    h, w, _ = registry.image_shape(teacher.module)
    p = int(teacher.module.patch_size)
    conditioned = d.head == "conv"
    return Discriminator(blocks, (h // p, w // p), int(d.width), d.head,
                         num_classes=(teacher.num_classes or 0) if conditioned else 0,
                         pooled_dim=int(getattr(teacher.module, "pooled_projection_dim", 0)) if conditioned else 0)


def time_shift(cfg) -> float:
    """``ladd.time_shift`` S (runs from before the option: 1): the student's training times and its
    sampler's grid are both moved by SD3's shift, t -> S t / (1 + (S - 1) t), so they stay the same
    times (FastGen's 4-step list for Wan is the unit grid under S = 5)."""
    shift = float(cfg.ladd.get("time_shift", 1.0))
    if not shift > 0:
        raise InvalidArgument(f"ladd.time_shift must be positive, not {shift}")
    return shift


def objective(cfg, task: tasks.Task) -> LADD:
    c = cfg.ladd
    template = task.teacher.replace(params=None)  # the student is the teacher's network
    heads = discriminator_module(cfg, task.teacher)
    shift = time_shift(cfg)
    return LADD(template, template, heads, heads.blocks, task.cond_fn, task.uncond_fn, loss=c.loss,
                times=tuple(float(shift_time(float(t), shift)) for t in c.times),
                time_probs=tuple(float(p) for p in c.time_probs),
                renoise_mean=float(c.renoise_mean), renoise_std=float(c.renoise_std), r1_weight=float(c.r1_weight),
                r1_sigma=float(c.r1_sigma), distill_weight=float(c.distill_weight),
                distill_guidance=float(c.distill_guidance))


def init_discriminator(module: Discriminator, task: tasks.Task, seed: int):
    """Fresh heads, shaped by the teacher's tapped tokens (their shapes only: nothing runs)."""
    teacher = task.teacher
    z, t = jnp.zeros((1, *registry.image_shape(teacher.module))), jnp.full((1,), 0.5)
    cond = task.sample_cond(1)
    # the params as an argument: a plan's are ShapeDtypeStructs
    feats = jax.eval_shape(lambda p: teacher.replace(params=p).features(z, t, cond, blocks=module.blocks),
                           teacher.params)
    feats = {k: jnp.zeros(v.shape, v.dtype) for k, v in feats.items()}
    return module.init(jax.random.key(seed), feats, teacher.schedule.model_time(t), **discriminator_cond(cond))["params"]


def engine(cfg, task: tasks.Task, steps: int) -> engine_lib.Engine:
    obj = objective(cfg, task)
    d_every, g_every = (common.check_steps(cfg.ladd[k], f"ladd.{k}") for k in ("d_every", "g_every"))
    # each schedule runs over the updates its part gets: steps 0, every, 2 every, ... (ceil(steps / every))
    tx_g, lr_g = optim.from_config(cfg.student.optim, -(-steps // g_every))
    tx_d, lr_d = optim.from_config(cfg.discriminator.optim, -(-steps // d_every))
    fixed_table = isinstance(task.teacher.module, mmdit.SD3Transformer2DModel)  # SD3's position table is a buffer
    parts = {PART: engine_lib.Part(tx_g, lr_g, mmdit.trainable_mask if fixed_table else None),
             DISC: engine_lib.Part(tx_d, lr_d)}
    updates = [engine_lib.Update(DISC, obj.d_loss, lambda state, frozen: (state.params(PART), frozen), d_every),
               engine_lib.Update(PART, obj.g_loss, lambda state, frozen: (state.params(DISC), frozen), g_every)]
    decay = float(cfg.train.ema_decay)
    return engine_lib.Engine(parts, updates, {"ema": engine_lib.Average(PART, decay)} if decay else {})


def stage(cfg, task: tasks.Task) -> stages.Stage:
    steps = common.check_steps(cfg.train.steps, "train.steps")
    stored = config_lib.to_dict(cfg)
    if stored.get("teacher", {}).get("workdir"):  # so a table finds the teacher from any folder
        stored["teacher"]["workdir"] = os.path.abspath(stored["teacher"]["workdir"])
    seed = int(cfg.seed)
    module = discriminator_module(cfg, task.teacher)

    def init():  # the student starts as the teacher
        return {PART: task.teacher.params, DISC: init_discriminator(module, task, seed)}

    return stages.Stage("", steps, engine(cfg, task, steps), init, seed + 1, stored, task.teacher.params,
                        identity=IDENTITY_SECTIONS, part=PART, jit_init=False,
                        sample_fn=grid_sampler(cfg, task))


def plan_steps(cfg) -> list:
    """The two-part LADD step, for `jdistill plan`: the discriminator's update, then the generator's
    (student forward and backward through the frozen teacher's features and the heads); the teacher's
    weights are never read, the batch is the synthetic latents with their prompts' embeddings."""
    from jdistill.plan.steps import TrainStep

    task = tasks.plan_task(cfg)
    heads = discriminator_module(cfg, task.teacher)
    modules = {"teacher": task.teacher.module, PART: task.teacher.module}
    return [TrainStep.of_stage(stage(cfg, task), tasks.plan_batch(task, cfg.data.batch_size), modules=modules,
                               settings=common.plan_settings(cfg),
                               description=f"LADD step: discriminator ({len(heads.blocks)} heads on the frozen "
                               "teacher's tokens) then generator, every part's optimizer state")]


def setup(cfg, workdir: str | None, mesh=None):
    """(the stage ready to step, its task with the synthetic source): tests drive LADD step by step."""
    task = synth.task(cfg)
    mesh = mesh if mesh is not None else common.make_mesh(cfg)
    return stages.setup(stage(cfg, task), workdir, cfg.train, mesh), task


def train(cfg, workdir: str, *, progress: bool = True, mesh=None, allow_inexact_resume: bool = False):
    """Synthetic data (unless written), then the LADD stage; returns the final TrainState."""
    common.check_train_config(cfg, mesh)
    common.check_steps(cfg.train.steps, "train.steps")
    tasks.ensure_teacher(cfg, progress)
    task = synth.task(cfg, with_data=False)
    synth.generate(cfg, progress=progress, teacher_task=task)
    task.source = synth.data_source(cfg, task)
    return stages.run(stage(cfg, task), workdir, cfg, lambda k: task.source.iterate(k), mesh=mesh, progress=progress,
                      allow_inexact=allow_inexact_resume)


def sample_fn(task: tasks.Task, student, steps: int, shift: float = 1.0):
    """``fn(noise, cond, key)`` of the unguided N-step sampler (the unit grid under ``shift``); text
    tasks read the sample prompts."""
    grid = unit_grid(student.schedule, steps, shift)

    def fn(noise, cond, key):
        cond = task.sample_cond(noise.shape[0]) if task.num_classes is None else cond
        return task.decode(samplers.sample_jit(student, noise, cond, grid=grid, solver=SOLVER, rng=key))

    return fn


def grid_sampler(cfg, task: tasks.Task, num: int = 100):
    noise = jax.random.normal(jax.random.key(1234), (num, *registry.image_shape(task.teacher.module)))
    cond = task.sample_cond(num)

    def sample(params):
        return sample_fn(task, task.teacher.replace(params=params), int(cfg.sample.steps), time_shift(cfg))(
            noise, cond, jax.random.key(0))

    return sample


def load_student(workdir: str, *, use_ema: bool = True):
    """(the student Denoiser with trained params, its task, config); never trains."""
    cfg = runs.read_config(workdir)
    task = synth.task(cfg, with_data=False)
    params = runs.read_params(workdir, part=PART, average="ema" if use_ema else None)
    return task.teacher.replace(params=params), task, cfg


def make_sampler(run: runs.Run, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True,
                 **unused) -> Sampler:
    """The student, unguided, with LADD's re-noising sampler at any step count."""
    common.refuse_options(unused, "a LADD student")
    if guidance_scale is not None:
        raise InvalidArgument("a LADD student samples unguided (it learnt the teacher's CFG samples); drop --guidance")
    if solver not in (None, SOLVER) or stochastic:
        raise InvalidArgument(f"a LADD student samples with its own sampler (x_hat, then re-noised to the next "
                              f"time: --solver {SOLVER}), not {solver or '--stochastic'}")
    den, task, cfg = load_student(run.workdir, use_ema=use_ema)
    steps = common.check_steps(steps or cfg.sample.steps, "--steps")
    return Sampler(fn=sample_fn(task, den, steps, time_shift(cfg)), image_shape=registry.image_shape(den.module),
                   num_classes=task.num_classes, description=f"LADD student, {steps} steps, unguided")


def member(run: runs.Run, guidance_scale: float) -> Member:
    """The student for composite samplers: no guidance at all."""
    den, _, _ = load_student(run.workdir)
    return Member(den, None, {}, f"{run_name(run)} (LADD student)")


RECIPE = Recipe("ladd", "LADD: adversarial distillation on synthetic data, the frozen teacher as the "
                "discriminator's feature network", "distill", train=train, sampler=make_sampler, member=member,
                plan=plan_steps, guided_sampling=False)
