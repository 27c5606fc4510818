"""CoDi (Mei et al., CVPR 2024) and its baselines: few-step conditional samplers from a diffusion prior.

    jdistill distill --config configs/digits_codi.py --workdir runs/digits_codi_sr2
    jdistill sample --workdir runs/digits_codi_sr2/codi --steps 4 --condition conditions.npz
    jdistill codi-table --workdir runs/digits_codi_sr2 --workdir runs/digits_codi_inpaint --out runs/codi_table

One workdir per conditional task (``recipes.conditional``), one stage per method, all from the
same prior on the same data and budget (``methods`` picks which to train):

    finetune/   (a) the adapted network fine-tuned on the denoising loss (a multi-step sampler)
    lcm_prior/  (b) stage 1: the prior consistency-distilled unconditionally (LCM, no guidance)
    two_stage/  (b) stage 2: that student with the adapter, fine-tuned on the denoising loss
    codi/       (c) CoDi: backbone + adapter on ``objectives.codi.codi_loss``
    pe_codi/    (d) PE-CoDi: the same loss, the backbone frozen (adapter-only trainable mask)

Samplers: ``finetune`` with DDIM (any step count); the others with CoDi's deterministic
consistency sampler (``codi``; ``lcm``: LCMScheduler's) on LCM's timesteps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdistill.errors import InvalidArgument
from jdistill.models import adapters, registry
from jdistill.objectives.codi import codi_loss
from jdistill.objectives.consistency import with_guidance_input
from jdistill.objectives.denoising import denoising_loss
from jdistill.recipes import Recipe, common, conditional, consistency, members, runs, stages
from jdistill.recipes.evaluation import Sampler
from jdistill.recipes.members import Member
from jdistill.sampling import samplers
from jdistill.train import engine as engine_lib
from jdistill.train import optim

PART = consistency.PART
METHODS = ("finetune", "two_stage", "codi", "pe_codi")
CONSISTENCY_STAGES = ("two_stage", "codi", "pe_codi")
SPLIT_SEEDS = {"test": 0, "train": 1}  # the seed of each split's inpainting masks
IDENTITY_SECTIONS = ("teacher", "condition", "adapter", "codi", "stage")


def _stage(cfg, name, steps, engine, init, task, frozen=None) -> stages.Stage:
    return stages.Stage(name, steps, engine, lambda: {PART: init()}, int(cfg.seed) + 13,
                        consistency.stored_config(cfg, name, steps), frozen, identity=IDENTITY_SECTIONS, part=PART,
                        jit_init=False, sample_fn=grid_sampler(cfg, task, name))


def finetune_stage(cfg, task: conditional.ConditionalTask, name: str = "finetune", backbone=None) -> stages.Stage:
    """The adapted network on the prior's denoising loss (conditions as data; no condition dropout);
    ``backbone``: start from these params (the two-stage baseline's consistency student)."""
    steps = common.check_steps(cfg.two_stage.finetune_steps if name == "two_stage" else cfg.finetune.steps,
                               f"{name}.steps")
    loss = denoising_loss(task.model, weighting=cfg.finetune.weighting, cond_fn=task.cond_fn)
    tx, lr = optim.from_config(cfg.optim, steps)
    engine = engine_lib.single(loss, tx, lr, part=PART, ema_decay=float(cfg.train.ema_decay) or None)
    return _stage(cfg, name, steps, engine, lambda: task.init_params(int(cfg.seed), backbone), task)


def codi_stage(cfg, task: conditional.ConditionalTask, name: str = "codi") -> stages.Stage:
    """CoDi (``name="codi"``) or PE-CoDi (``"pe_codi"``: the backbone frozen by the trainable mask)."""
    c = cfg.codi
    steps = common.check_steps(c.steps, "codi.steps")
    scale_range = tuple(c.scale_range) if c.get("scale_range") else None
    teacher = task.teacher.replace(params=None)
    loss = codi_loss(task.model, teacher, cond_fn=task.cond_fn, uncond_fn=task.uncond_fn,
                     teacher_cond_fn=task.prior_cond_fn, teacher_uncond_fn=task.prior_uncond_fn,
                     num_steps=int(c.num_steps), scale_range=scale_range, guidance_weight=float(c.guidance_weight),
                     ode=c.ode, solver=c.solver, distance=c.distance, huber_c=float(c.huber_c),
                     timestep_scaling=float(c.timestep_scaling))
    engine = consistency.target_engine(loss, cfg.optim, steps, target_decay=float(c.target_decay),
                                       ema_decay=float(cfg.train.ema_decay),
                                       trainable=adapters.adapter_mask if name == "pe_codi" else None)
    return _stage(cfg, name, steps, engine, lambda: task.init_params(int(cfg.seed)), task,
                  task.teacher.params if c.ode == "teacher" else None)


def plan_steps(cfg) -> list:
    """For `jdistill plan`: the CoDi and PE-CoDi steps the config's ``methods`` name (PE-CoDi: the same
    program, the optimizer state only for the adapter); the prior's weights are never read."""
    from jdistill.plan.steps import TrainStep

    task = conditional.plan_task(cfg)
    batch = conditional.plan_batch(cfg, task)
    modules = {"teacher": task.teacher.module, PART: task.model.module}
    what = {"codi": "backbone and adapter train", "pe_codi": "the adapter trains, the backbone is frozen"}
    return [TrainStep.of_stage(codi_stage(cfg, task, name), batch, modules=modules,
                               settings=common.plan_settings(cfg),
                               description=f"{name}: one PF-ODE step of the conditional model ({cfg.codi.ode}) with "
                               f"CFG, the target average, the model forward and backward; {what[name]}")
            for name in ("codi", "pe_codi") if name in cfg.methods]


def stage_sequence(cfg, task: conditional.ConditionalTask):
    methods = list(cfg.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidArgument(f"unknown method(s) {unknown}; expected some of {METHODS}")
    if "finetune" in methods:
        yield finetune_stage(cfg, task)
    if "two_stage" in methods:
        student = yield consistency.lcm_stage(cfg, task.prior, "lcm_prior", guided=False)
        yield finetune_stage(cfg, task, "two_stage", backbone=student)
    for name in ("codi", "pe_codi"):
        if name in methods:
            yield codi_stage(cfg, task, name)


def train(cfg, workdir: str, *, progress: bool = True, mesh=None, allow_inexact_resume: bool = False) -> dict:
    from jdistill.recipes import tasks

    common.check_train_config(cfg, mesh)
    tasks.ensure_teacher(cfg, progress)
    task = conditional.make_task(cfg)
    return stages.run_sequence(stage_sequence(cfg, task), workdir, cfg, lambda k: task.source.iterate(k), mesh=mesh,
                               progress=progress, allow_inexact=allow_inexact_resume)


def default_sampling(stage: str, cfg) -> tuple[str, int]:
    """(solver, steps) a stage samples with unless told: DDIM 50 for the fine-tuned model, else the
    config's consistency sampler."""
    if stage == "finetune":
        return "ddim", 50
    return cfg.sample.solver, int(cfg.sample.steps)


def skip_grid_steps(stage: str, cfg) -> int:
    """The skip grid (N teacher steps) a consistency stage was trained on: the two-stage baseline's
    backbone is the LCM prior (``lcm.num_steps``), CoDi and PE-CoDi train on ``codi.num_steps``."""
    return int(cfg.lcm.num_steps if stage == "two_stage" else cfg.codi.num_steps)


def conditional_fn(task: conditional.ConditionalTask, den, grid, solver, guidance_scale=None):
    """``fn(noise, cond, key)`` for a conditional network: ``cond["condition"]`` the condition images."""
    def fn(noise, cond, key):
        n = noise.shape[0]
        text = task.prior_uncond_fn is not None  # a text prior samples the config's prompts
        base = task.prior.sample_cond(n) if text else task.prior_cond_fn({"image": noise})
        full = with_guidance_input(den.module, {**base, "condition": jnp.asarray(cond["condition"])},
                                   None if guidance_scale is None else jnp.full((n,), guidance_scale))
        return task.prior.decode(samplers.sample_jit(den, noise, full, grid=grid, solver=solver, rng=key))
    return fn


def grid_sampler(cfg, task: conditional.ConditionalTask, stage: str, num: int = 100):
    """Samples for the progress grids: the first ``num`` evaluation conditions (class priors)."""
    if task.prior_uncond_fn is not None:
        return None
    evals = conditional.evaluation_set(cfg, task.spec)
    solver, steps = default_sampling(stage, cfg)
    grid = consistency.sampler_grid(cfg, task.model.schedule, solver, skip_grid_steps(stage, cfg), steps)[0]
    noise = jax.random.normal(jax.random.key(1234), (num, *registry.image_shape(task.model.module)))
    cond = {"condition": evals.conditions[:num]}

    def sample(params):
        return conditional_fn(task, task.model.replace(params=params), grid, solver)(noise, cond, jax.random.key(0))

    return sample


def make_sampler(run: runs.Run, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True,
                 condition=None, spacing=None, timesteps=None, split="test", **unused) -> Sampler:
    """The stage pointed at (default ``codi``) on the conditions of the dataset's ``split`` (``test``:
    the evaluation set; ``train``: a collaboration's calibration set, its masks drawn apart), or on
    ``condition`` (a ``.npz``: ``data.conditions.read_condition_file``)."""
    from jdistill.data.conditions import read_condition_file

    common.refuse_options(dict(unused, stochastic=stochastic), "a conditional model")
    stage = run.stage or "codi"
    if stage not in run.stages:
        raise InvalidArgument(f"{run.workdir} has no {stage!r} stage (it has {list(run.stages)})")
    cfg = run.stage_config(stage)
    task = conditional.make_task(cfg, with_data=False)
    den = task.model.replace(params=runs.read_params(run.workdir, stage, part=PART))
    default_solver, default_steps = default_sampling(stage, cfg)
    solver = solver or default_solver
    if stage in CONSISTENCY_STAGES and solver not in consistency.SAMPLERS:
        raise InvalidArgument(f"the {stage} model samples with {consistency.SAMPLERS}, not {solver!r}")
    grid, steps, spacing = consistency.sampler_grid(cfg, den.schedule, solver, skip_grid_steps(stage, cfg),
                                                    steps or (default_steps if timesteps is None else None),
                                                    spacing, timesteps)
    shape = registry.image_shape(den.module)
    if cfg.codi.get("scale_range") and guidance_scale is None:  # the model reads the scale as an input
        guidance_scale = float(cfg.sample.guidance_scale)
    if condition is not None:
        text = task.prior_uncond_fn is not None  # a latent model's conditions are pixels
        cond_shape = (int(cfg.data.resolution),) * 2 + (3,) if text else shape
        conds, targets, labels = read_condition_file(condition, task.spec, cond_shape), None, None
    else:
        if split not in SPLIT_SEEDS:
            raise InvalidArgument(f"conditions come from the {tuple(SPLIT_SEEDS)} split, not {split!r}")
        evals = conditional.evaluation_set(cfg, task.spec, split, SPLIT_SEEDS[split])
        conds, targets, labels = evals.conditions, evals.images, evals.labels
    sampler = Sampler(fn=conditional_fn(task, den, grid, solver, guidance_scale), image_shape=shape, num_classes=None,
                      description=f"{stage} {solver} {steps} steps{consistency.grid_text(spacing, timesteps)} "
                                  f"({task.spec.name})",
                      conditions={"condition": conds}, targets=targets, source_labels=labels,
                      condition_kind=task.spec.name)
    return sampler


def member(run: runs.Run, guidance_scale: float) -> Member:
    """The fine-tuned conditional model (stage ``finetune``, the run's many-step sampler) as a
    collaboration's teacher of a CoDi student: it reads the condition images of the student's samples
    and the prior's null class; no CFG (it was trained without condition dropout), so
    ``guidance_scale`` does not apply."""
    stage = run.stage or "finetune"
    if stage != "finetune":
        raise InvalidArgument(f"{run.workdir}: the {stage!r} stage is a few-step model; a CoDi run's teacher for "
                              "composite samplers is its many-step conditional model, the 'finetune' stage")
    if stage not in run.stages:
        raise InvalidArgument(f"{run.workdir} has no 'finetune' stage (it has {list(run.stages)}); train it with "
                              "--config.methods including 'finetune'")
    cfg = run.stage_config(stage)
    task = conditional.make_task(cfg, with_data=False)
    if task.prior_uncond_fn is not None:
        raise InvalidArgument(f"{run.workdir}: a text-to-image CoDi run composes through the text-to-image "
                              "collaboration configs, not as a member of trained runs")
    den = task.model.replace(params=runs.read_params(run.workdir, stage, part=PART))
    shape = registry.image_shape(den.module)
    return Member(den, None, {}, members.run_name(run), condition_kind=task.spec.name,
                  fixed_cond=lambda n: task.prior_cond_fn({"image": jnp.zeros((n, *shape), jnp.float32)}))


# a CoDi model reads a guidance scale only if trained with one (``codi.scale_range``), at its config's scale
RECIPE = Recipe("codi", "CoDi / PE-CoDi and their baselines: few-step conditional samplers from a prior", "distill",
                train=train, sampler=make_sampler, member=member, plan=plan_steps, guided_sampling=False)
