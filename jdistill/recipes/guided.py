"""Guided distillation (Meng et al., CVPR 2023): stage 1, then progressive halvings.

    jdistill distill --config configs/digits_guided.py --workdir runs/digits_guided
    jdistill sample --workdir runs/digits_guided --steps 4 --guidance 1.5
    jdistill guided-table --workdir runs/digits_guided --guidance 1.5 2.0 --out runs/guided_table

Stages (each an Orbax checkpoint directory of its own, see ``recipes/stages.py``):

    stage1/      the guidance-conditioned student (one pass = the teacher with CFG)
    steps_032/   the 32-step student, distilled from stage 1 used as a 64-step teacher
    steps_016/   ... each round from the previous one, with a fresh optimizer (Salimans & Ho)
    steps_001/

The teacher is a :class:`~jdistill.recipes.tasks.Task`: a class-conditional workdir or a
text-to-image pipeline. The student reads the guidance scale g (diffusers' convention) as
its ``guidance`` condition; Meng et al.'s w = g - 1.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import config as config_lib
from jdistill.convert.engine import graft, init_parts
from jdistill.denoiser import Denoiser
from jdistill.diffusion.timesteps import unit_grid
from jdistill.errors import InvalidArgument, check_finite, check_positive_int
from jdistill.models import registry
from jdistill.objectives.guided import guided_loss
from jdistill.objectives.progressive import progressive_loss
from jdistill.recipes import Recipe, common, runs, stages, tasks
from jdistill.recipes.evaluation import Sampler
from jdistill.recipes.members import Member, run_name
from jdistill.sampling import samplers
from jdistill.train import engine as engine_lib
from jdistill.train import optim

GUIDANCE_MODULE = "guidance_embedder"
PART = "student"
# what a stage's params depend on: resuming with other values is refused
IDENTITY_KEYS = ("teacher", "guidance", "stage.name")


def exact_keys(section: str) -> tuple[str, ...]:
    """What a stage's run depends on (``stage1`` or ``progressive``): changed only with --allow-inexact-resume."""
    return ("seed", "data.name", "data.batch_size", "stage.steps", f"{section}.optim", f"{section}.weighting",
            "train.ema_decay")


def check_progressive(cfg) -> None:
    """The halvings and the guidance range a config asks for make sense."""
    start = check_positive_int("--config.progressive.start_steps", cfg.progressive.start_steps)
    end = check_positive_int("--config.progressive.end_steps", cfg.progressive.end_steps)
    if end > start:
        raise InvalidArgument(f"--config.progressive.end_steps={end} is more than start_steps={start}")
    scale_range = tuple(cfg.guidance.scale_range)
    if len(scale_range) != 2:
        raise InvalidArgument(f"--config.guidance.scale_range must be (low, high), got {scale_range}")
    low, high = (check_finite("--config.guidance.scale_range", g) for g in scale_range)
    if low > high:
        raise InvalidArgument(f"--config.guidance.scale_range=({low:g}, {high:g}): low is above high")
    if "default" not in dict(cfg.progressive.train_steps):
        raise InvalidArgument("--config.progressive.train_steps needs a 'default' entry (steps of a round not "
                              "listed by its step count)")


def rounds(cfg) -> list[int]:
    """Student step counts of the progressive rounds: start, start / 2, ..., end."""
    n, out = int(cfg.progressive.start_steps), []
    while n >= int(cfg.progressive.end_steps):
        out.append(n)
        n //= 2
    return out


def round_steps(cfg, n: int) -> int:
    """Training steps of the round whose student takes ``n`` sampling steps."""
    per = dict(cfg.progressive.train_steps)
    return int(per.get(str(n), per.get("default")))


def stage_steps(cfg) -> list[tuple[str, int]]:
    """(stage name, training steps) of every stage, in order."""
    return [("stage1", int(cfg.stage1.steps))] + [(f"steps_{n:03d}", round_steps(cfg, n)) for n in rounds(cfg)]


def student_template(teacher: Denoiser) -> Denoiser:
    return teacher.replace(module=teacher.module.clone(guidance_embed=True), params=None)


def _stage(cfg, name: str, steps: int, loss_fn, optim_cfg, init, frozen, task: tasks.Task, student) -> stages.Stage:
    section = "stage1" if name == "stage1" else "progressive"
    tx, lr = optim.from_config(optim_cfg, steps, key=f"{section}.optim")
    stored = config_lib.to_dict(cfg)
    stored["stage"] = {"name": name, "steps": steps}
    if stored.get("teacher", {}).get("workdir"):  # so a table finds the teacher from any folder
        stored["teacher"]["workdir"] = os.path.abspath(stored["teacher"]["workdir"])
    engine = engine_lib.single(loss_fn, tx, lr, part=PART, ema_decay=float(cfg.train.ema_decay) or None)
    return stages.Stage(name, steps, engine, lambda: {PART: init()}, int(cfg.seed) + 7, stored, frozen,
                        identity=IDENTITY_KEYS, exact=exact_keys(section),
                        part=PART, jit_init=False,
                        sample_fn=grid_sampler(cfg, task, student, name))


def init_student(cfg, teacher: Denoiser):
    """Stage 1's initial params: the teacher's, plus a fresh (zero-output) guidance embedding."""
    student = student_template(teacher)
    args, kwargs = registry.example_inputs(student.module)
    fresh = init_parts(student.module, (GUIDANCE_MODULE,), jax.random.key(int(cfg.seed)), *args, **kwargs)
    return graft(teacher.params, fresh, new=(GUIDANCE_MODULE,))


def stage1(cfg, task: tasks.Task) -> stages.Stage:
    teacher, student = task.teacher, student_template(task.teacher)
    loss = guided_loss(student, teacher.replace(params=None), scale_range=tuple(cfg.guidance.scale_range),
                       cond_fn=task.cond_fn, uncond_fn=task.uncond_fn, weighting=cfg.stage1.weighting)
    return _stage(cfg, "stage1", int(cfg.stage1.steps), loss, cfg.stage1.optim, lambda: init_student(cfg, teacher),
                  teacher.params, task, student)


def halving(cfg, task: tasks.Task, n: int, previous) -> stages.Stage:
    """The round whose N-step student learns two DDIM steps of ``previous`` (the 2N-step model)."""
    student = student_template(task.teacher)
    loss = progressive_loss(student, student, num_steps=n, scale_range=tuple(cfg.guidance.scale_range),
                            cond_fn=task.cond_fn, weighting=cfg.progressive.weighting)
    return _stage(cfg, f"steps_{n:03d}", round_steps(cfg, n), loss, cfg.progressive.optim, lambda: previous, previous,
                  task, student)


def stage_sequence(cfg, task: tasks.Task):
    """Stage 1, then each halving built from the previous stage's params (``params = yield stage``)."""
    params = yield stage1(cfg, task)
    for n in rounds(cfg):
        params = yield halving(cfg, task, n, params)


def train(cfg, workdir: str, *, progress: bool = True, mesh=None, allow_inexact_resume: bool = False) -> dict:
    """Stage 1, then every halving; returns {stage name: final params}."""
    common.check_train_config(cfg, mesh)
    check_progressive(cfg)
    for section in ("stage1", "progressive"):  # before a missing teacher is trained
        optim.check_config(cfg[section].optim, f"{section}.optim")
    for name, steps in stage_steps(cfg):
        common.check_steps(steps, f"steps of stage {name}")
    tasks.ensure_teacher(cfg, progress)
    task = tasks.make_task(cfg)
    return stages.run_sequence(stage_sequence(cfg, task), workdir, cfg, lambda k: task.source.iterate(k), mesh=mesh,
                               progress=progress, allow_inexact=allow_inexact_resume)


def plan_steps(cfg) -> list:
    """Stage 1's step and a halving's (every halving compiles the same program), for `jdistill plan`:
    the teacher's weights are never read, the batch is the config's."""
    from jdistill.plan.steps import TrainStep, abstract_value, image_batch

    task = tasks.plan_task(cfg)
    batch = image_batch(cfg.data.batch_size, registry.image_shape(task.teacher.module))
    first = stage1(cfg, task)
    student = abstract_value(lambda: first.init()[PART])
    n = rounds(cfg)[0]
    modules = {"teacher": task.teacher.module, PART: student_template(task.teacher).module}
    return [TrainStep.of_stage(first, batch, modules=modules, description="stage 1: the guidance-conditioned student "
                               "learns the teacher's CFG output (teacher: 2 passes, student: 1 pass + backward)"),
            TrainStep.of_stage(halving(cfg, task, n, student), batch, modules=modules,
                               description=f"a halving round ({2 * n} -> {n} steps): two DDIM steps of the previous "
                               "student (frozen) as the target of one student step")]


def grid_sampler(cfg, task: tasks.Task, student: Denoiser, stage_name: str, num: int = 100):
    n = student_steps(stage_name) or int(cfg.sample.steps)
    grid = unit_grid(student.schedule, n)
    noise = jax.random.normal(jax.random.key(1234), (num, *registry.image_shape(student.module)))
    cond = dict(task.sample_cond(num), guidance=np.full((num,), float(cfg.sample.guidance_scale), np.float32))

    def sample(params):
        return task.decode(samplers.sample_jit(student.replace(params=params), noise, cond, grid=grid, solver="ddim"))

    return sample


def student_steps(stage_name: str) -> int | None:
    return int(stage_name.split("_")[1]) if stage_name.startswith("steps_") else None


def load_student(workdir: str, stage_name: str, task: tasks.Task | None = None) -> tuple[Denoiser, object]:
    """(student Denoiser with trained params, config) of a finished or running stage; never trains."""
    cfg = runs.read_config(workdir, stage_name)
    task = task or tasks.make_task(cfg, with_data=False)
    params = runs.read_params(workdir, stage_name, part=PART)
    return student_template(task.teacher).replace(params=params), cfg


def pick_stage(run: runs.Run, steps: int) -> str:
    """The stage a run samples ``steps`` steps with: the one pointed at, else the round trained for
    that count, else the stage-1 student (a full-length sampler)."""
    if run.stage:
        return run.stage
    name = f"steps_{steps:03d}"
    return name if name in run.stages else "stage1"


def make_sampler(run: runs.Run, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True,
                 **unused) -> Sampler:
    """The distilled student for ``steps`` sampling steps, DDIM or (``stochastic``) Meng et al.'s N-step
    stochastic sampler. One model call per step: guidance is an input, not CFG."""
    common.refuse_options(unused, "a guided-distillation student")
    common.check_sampling(steps, solver, guidance_scale)
    if solver not in (None, "ddim"):
        raise InvalidArgument(f"a distilled student samples with ddim (or --stochastic), not {solver!r}")
    if "stage1" not in run.stages and not run.stage:
        raise InvalidArgument(f"{run.workdir} has no stage1 checkpoints")
    trained = student_steps(run.stage or "")
    steps = int(steps or trained or run.config.sample.steps)
    if trained and steps != trained:
        raise InvalidArgument(f"the stage {run.stage} was distilled for {trained} steps; sample it with --steps "
                              f"{trained} (or point --workdir at the run to pick a stage by step count)")
    name = pick_stage(run, steps)
    cfg = run.stage_config(name)
    task = tasks.make_task(cfg, with_data=False)
    den, _ = load_student(run.workdir, name, task)
    g = float(cfg.sample.guidance_scale if guidance_scale is None else guidance_scale)
    mode = "stochastic" if stochastic else "ddim"
    grid = unit_grid(den.schedule, steps)

    def fn(noise, cond, key):
        n = noise.shape[0]
        full = dict(task.sample_cond(n) if task.num_classes is None else cond, guidance=jnp.full((n,), g))
        return task.decode(samplers.sample_jit(den, noise, full, grid=grid, solver=mode, rng=key))

    return Sampler(fn=fn, image_shape=registry.image_shape(den.module), num_classes=task.num_classes,
                   description=f"student ({name}) {mode} {steps} steps, g={g:g}")


def member(run: runs.Run, guidance_scale: float) -> Member:
    """The stage pointed at, or the stage-1 student (any step count); guidance is its input. A
    progressive round keeps its step count: stitched sampling refuses it on another grid, and a
    collaboration (whose budgets choose the teacher's steps) as a teacher at all."""
    name = run.stage or "stage1"
    den, _ = load_student(run.workdir, name)
    return Member(den, None, {"guidance": guidance_scale}, f"{run_name(run)} ({name} student)",
                  steps=student_steps(name))


RECIPE = Recipe("guided", "Meng et al.'s guided distillation: stage 1, then progressive halvings", "distill",
                train=train, sampler=make_sampler, member=member, plan=plan_steps)
