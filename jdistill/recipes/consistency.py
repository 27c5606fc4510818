"""Latent consistency distillation (LCM, Luo et al. 2023): a few-step student of any teacher.

    jdistill distill --config configs/digits_lcm.py --workdir runs/digits_lcm
    jdistill sample --workdir runs/digits_lcm --steps 4 --guidance 1.5       (LCMScheduler's sampler)
    jdistill lcm-table --workdir runs/digits_lcm --out runs/lcm_table

One stage, ``lcm/``: the student (the teacher's network plus a zero-initialised guidance input:
the guidance embedder, or LCM's ``time_cond_proj_dim`` w embedding for SD UNets) trained on
``objectives.consistency.lcm_loss`` against the target average theta^- (decay ``lcm.target_decay``,
0.95 as LCM), which the loss reads from the train state inside the jitted step. Sampled with
LCMScheduler's multistep sampler (``lcm``; ``codi``: CoDi's deterministic one) on LCM's timesteps.
The teacher is a :class:`~jdistill.recipes.tasks.Task`: a class-conditional workdir or a
text-to-image pipeline (SD1.5 eps, SD2.1 v; its scheduler's schedule and prediction).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import config as config_lib
from jdistill.convert.engine import graft, init_parts
from jdistill.denoiser import Denoiser
from jdistill.diffusion.timesteps import make_grid
from jdistill.errors import InvalidArgument
from jdistill.models import registry
from jdistill.objectives.consistency import lcm_loss, with_guidance_input
from jdistill.recipes import Recipe, common, runs, stages, tasks
from jdistill.recipes.evaluation import Sampler
from jdistill.recipes.members import Member, run_name
from jdistill.sampling import samplers
from jdistill.train import engine as engine_lib
from jdistill.train import optim

PART = "student"
STAGE = "lcm"
SAMPLERS = ("lcm", "codi")
IDENTITY_SECTIONS = ("teacher", "lcm", "stage")
LCM_EMBEDDING_DIM = 256  # diffusers' LCM students: time_cond_proj_dim 256


def guidance_fields(module) -> dict:
    """The module fields that give a network a guidance input: LCM's w embedding for SD UNets, the
    guidance embedder for DiT / UNet2DModel."""
    if type(module).__name__ == "UNet2DConditionModel":
        return {"time_cond_proj_dim": LCM_EMBEDDING_DIM}
    return {"guidance_embed": True}


def student_template(teacher: Denoiser, guided: bool = True) -> Denoiser:
    module = teacher.module.clone(**guidance_fields(teacher.module)) if guided else teacher.module
    return teacher.replace(module=module, params=None)


def init_student(teacher: Denoiser, seed: int, guided: bool = True):
    """The teacher's params plus a guidance input that starts at exactly zero (the guidance embedder's
    zero last layer; LCM's ``cond_proj`` set to zero), so the student starts as the teacher."""
    if not guided:
        return teacher.params
    student = student_template(teacher)
    new = ("guidance_embedder", "cond_proj")
    args, kwargs = registry.example_inputs(student.module)
    fresh = init_parts(student.module, new, jax.random.key(seed), *args, **kwargs)
    params = graft(teacher.params, fresh, new=new)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", None) == "cond_proj" for k in path) else x, params)


def target_engine(loss_fn, optim_cfg, steps: int, *, target_decay: float, ema_decay: float = 0.0,
                  trainable=None) -> engine_lib.Engine:
    """One part trained on ``loss_fn``, whose ``inputs`` are {"teacher": frozen, "target": the target
    average theta^- as it is now}; an evaluation EMA as well when ``ema_decay``."""
    tx, lr = optim.from_config(optim_cfg, steps)

    def inputs(state, frozen):
        return {"teacher": frozen, "target": engine.average_params(state, "target")}

    averages = {"target": engine_lib.Average(PART, float(target_decay))}
    if ema_decay:
        averages["ema"] = engine_lib.Average(PART, float(ema_decay))
    engine = engine_lib.Engine({PART: engine_lib.Part(tx, lr, trainable)}, [engine_lib.Update(PART, loss_fn, inputs)],
                               averages)
    return engine


def stored_config(cfg, name: str, steps: int) -> dict:
    stored = config_lib.to_dict(cfg)
    stored["stage"] = {"name": name, "steps": steps}
    if stored.get("teacher", {}).get("workdir"):  # so a table finds the teacher from any folder
        stored["teacher"]["workdir"] = os.path.abspath(stored["teacher"]["workdir"])
    return stored


def scale_range(cfg):
    r = cfg.lcm.get("scale_range")
    return tuple(r) if r else None


def lcm_stage(cfg, task: tasks.Task, name: str = STAGE, *, guided: bool | None = None) -> stages.Stage:
    """The LCM stage of ``task``; ``guided=False``: an unconditional distillation (null class, no CFG)."""
    guided = scale_range(cfg) is not None if guided is None else guided
    lc = cfg.lcm
    steps = common.check_steps(lc.steps, "lcm.steps")
    teacher, student = task.teacher, student_template(task.teacher, guided)
    cond_fn = task.cond_fn if guided or task.num_classes is None else null_cond_fn(teacher)
    loss = lcm_loss(student, teacher.replace(params=None), num_steps=int(lc.num_steps),
                    scale_range=scale_range(cfg) if guided else None, cond_fn=cond_fn, uncond_fn=task.uncond_fn,
                    solver=lc.solver, distance=lc.distance, huber_c=float(lc.huber_c),
                    timestep_scaling=float(lc.timestep_scaling))
    engine = target_engine(loss, cfg.optim, steps, target_decay=float(lc.target_decay),
                           ema_decay=float(cfg.train.ema_decay))
    return stages.Stage(name, steps, engine, lambda: {PART: init_student(teacher, int(cfg.seed), guided)},
                        int(cfg.seed) + 11, stored_config(cfg, name, steps), teacher.params,
                        identity=IDENTITY_SECTIONS, part=PART, jit_init=False,
                        sample_fn=grid_sampler(cfg, task, student, guided))


def null_cond_fn(teacher: Denoiser):
    """A class-conditional teacher as an unconditional prior: every label the null class."""
    def cond_fn(batch):
        return teacher.null_cond({"class_labels": jnp.zeros((batch["image"].shape[0],), jnp.int32)})
    return cond_fn


def train(cfg, workdir: str, *, progress: bool = True, mesh=None, allow_inexact_resume: bool = False) -> dict:
    common.check_train_config(cfg, mesh)
    tasks.ensure_teacher(cfg, progress)
    task = tasks.make_task(cfg)

    def sequence():
        yield lcm_stage(cfg, task)

    return stages.run_sequence(sequence(), workdir, cfg, lambda k: task.source.iterate(k), mesh=mesh,
                               progress=progress, allow_inexact=allow_inexact_resume)


def plan_steps(cfg) -> list:
    """The LCM step, for `jdistill plan`: one teacher solver step (with CFG when guided: 2 passes) to
    the target average's estimate, the student forward and backward; teacher weights never read."""
    from jdistill.plan.steps import TrainStep

    task = tasks.plan_task(cfg)
    st = lcm_stage(cfg, task)
    modules = {"teacher": task.teacher.module, PART: student_template(task.teacher).module}
    return [TrainStep.of_stage(st, tasks.plan_batch(task, cfg.data.batch_size), modules=modules,
                               settings=common.plan_settings(cfg),
                               description=f"LCM step: one {cfg.lcm.solver} step of the frozen teacher"
                               + (" with CFG (2 passes)" if scale_range(cfg) else "") + ", the target average "
                               "(no gradient) and the student (forward and backward)")]


def spacing_of(cfg, solver: str, spacing: str | None = None) -> str | None:
    """Which skip-grid timesteps a consistency sampler visits: ``spacing`` if given, else the config's
    ``sample.spacing`` (configs written before it: LCMScheduler's picks); None for other solvers,
    which refuse one."""
    if solver not in SAMPLERS:
        if spacing is not None:
            raise InvalidArgument(f"--spacing picks a consistency sampler's timesteps ({', '.join(SAMPLERS)}); "
                                  f"solver {solver!r} takes none")
        return None
    return spacing or cfg.sample.get("spacing") or "lcm"


def sampler_grid(cfg, schedule, solver: str, original_steps: int, steps=None, spacing=None, timesteps=None):
    """(grid, steps, spacing) a sampler walks: a consistency solver's picks from the ``original_steps``
    skip grid by ``spacing`` (default: the config's), or ``timesteps`` as listed, which set the step
    count and go with no spacing and no other count (``diffusion.timesteps.make_grid``)."""
    if timesteps is None:
        steps, spacing = int(steps or cfg.sample.steps), spacing_of(cfg, solver, spacing)
    elif spacing is not None:
        raise InvalidArgument("--timesteps and --spacing both choose the sampler's timesteps; give one")
    elif steps is not None and int(steps) != len(timesteps):
        raise InvalidArgument(f"--steps {steps} but {len(timesteps)} --timesteps {list(timesteps)}")
    steps = len(timesteps) if timesteps is not None else steps
    try:
        grid = make_grid(schedule, steps, solver, spacing, timesteps=timesteps, original_inference_steps=original_steps)
    except ValueError as e:  # a spacing, step count or timestep list the grid cannot take, named by the grid
        raise InvalidArgument(str(e)) from None
    return grid, steps, spacing


def grid_text(spacing: str | None, timesteps) -> str:
    """How a sampler description names its timesteps when they are not LCMScheduler's."""
    if timesteps is not None:
        return ", at " + " ".join(f"{t:g}" for t in timesteps)
    return "" if spacing in (None, "lcm") else f", {spacing} spacing"


def grid_sampler(cfg, task: tasks.Task, student: Denoiser, guided: bool, num: int = 100):
    grid = sampler_grid(cfg, student.schedule, cfg.sample.solver, int(cfg.lcm.num_steps))[0]
    noise = jax.random.normal(jax.random.key(1234), (num, *registry.image_shape(student.module)))
    cond = with_guidance_input(student.module, task.sample_cond(num) or {},
                               np.full((num,), float(cfg.sample.guidance_scale), np.float32) if guided else None)

    def sample(params):
        return task.decode(samplers.sample_jit(student.replace(params=params), noise, cond or None, grid=grid,
                                               solver=cfg.sample.solver, rng=jax.random.key(0)))

    return sample


def load_student(workdir: str, stage: str = STAGE, task: tasks.Task | None = None):
    """(student Denoiser with its sampling params, config, task) of a stage; never trains."""
    cfg = runs.read_config(workdir, stage)
    task = task or tasks.make_task(cfg, with_data=False)
    params = runs.read_params(workdir, stage, part=PART)
    guided = scale_range(cfg) is not None
    return student_template(task.teacher, guided).replace(params=params), cfg, task


def make_sampler(run: runs.Run, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True,
                 spacing=None, timesteps=None, **unused) -> Sampler:
    """The consistency student with LCMScheduler's sampler (``--solver codi``: CoDi's deterministic one);
    ``spacing``: which skip-grid timesteps it visits (``diffusion.timesteps.consistency_picks``), or
    ``timesteps``: a list (the schedule's own numbering: unit times on continuous schedules)."""
    common.refuse_options(dict(unused, stochastic=stochastic), "a consistency-distilled student")
    den, cfg, task = load_student(run.workdir, run.stage or STAGE)
    solver = solver or cfg.sample.solver
    if solver not in SAMPLERS:
        raise InvalidArgument(f"a consistency student samples with {SAMPLERS}, not {solver!r}")
    grid, steps, spacing = sampler_grid(cfg, den.schedule, solver, int(cfg.lcm.num_steps), steps, spacing, timesteps)
    g = float(cfg.sample.guidance_scale if guidance_scale is None else guidance_scale)
    guided = scale_range(cfg) is not None

    def fn(noise, cond, key):
        n = noise.shape[0]
        base = task.sample_cond(n) if task.num_classes is None else (cond or {})
        full = with_guidance_input(den.module, base, jnp.full((n,), g) if guided else None)
        return task.decode(samplers.sample_jit(den, noise, full or None, grid=grid, solver=solver, rng=key))

    return Sampler(fn=fn, image_shape=registry.image_shape(den.module), num_classes=task.num_classes,
                   description=f"LCM student {solver} {steps} steps" + (f", g={g:g}" if guided else "")
                   + grid_text(spacing, timesteps))


def member(run: runs.Run, guidance_scale: float) -> Member:
    den, cfg, _ = load_student(run.workdir, run.stage or STAGE)
    extra = {"guidance": guidance_scale} if scale_range(cfg) is not None and "guidance_embed" in guidance_fields(
        den.module) else {}
    return Member(den, None, extra, f"{run_name(run)} (LCM student)")


RECIPE = Recipe("lcm", "latent consistency distillation (LCM): a few-step student of any teacher", "distill",
                train=train, sampler=make_sampler, member=member, plan=plan_steps)
