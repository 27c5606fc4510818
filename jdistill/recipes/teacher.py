"""Teacher training: a diffusion model trained with the denoising loss, and sampling from it.

    jdistill train --config configs/digits_teacher.py --workdir runs/digits_teacher

Config sections read here: ``seed``, ``model`` (registry fields), ``diffusion``
(schedule kind + prediction), ``data``, ``loss``, ``optim``, ``train``, ``mesh``,
``sample`` (the grids written while training and the defaults of ``jdistill sample``).
The run is one stage whose checkpoints live in the workdir itself; its part is ``model``,
sampled through its EMA.
"""

from __future__ import annotations

import jax

from jdistill import config as config_lib
from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules
from jdistill.diffusion.timesteps import make_grid
from jdistill.errors import MissingInput
from jdistill.models import registry
from jdistill.objectives.denoising import denoising_loss, labels_cond
from jdistill.recipes import Recipe, common, runs, stages
from jdistill.recipes.evaluation import Sampler
from jdistill.recipes.members import Member, run_name
from jdistill.sampling import samplers
from jdistill.train import engine as engine_lib
from jdistill.train import optim

PART = "model"


def template(cfg) -> Denoiser:
    """The teacher's Denoiser without params: its module, schedule and prediction."""
    return Denoiser.for_module(registry.build_model(cfg.model), schedules.from_config(cfg.diffusion),
                               cfg.diffusion.prediction)


def stage(cfg) -> stages.Stage:
    den = template(cfg)
    loss_fn = denoising_loss(den, weighting=cfg.loss.weighting, cond_drop_prob=float(cfg.loss.cond_drop_prob),
                             cond_fn=labels_cond if den.num_classes else None,
                             min_snr_gamma=float(cfg.loss.get("min_snr_gamma", 5.0)),
                             time_sampling=cfg.loss.get("time_sampling", "uniform"),
                             logit_mean=float(cfg.loss.get("logit_mean", 0.0)),
                             logit_std=float(cfg.loss.get("logit_std", 1.0)))
    steps = int(cfg.train.steps)
    tx, lr = optim.from_config(cfg.optim, steps, key="optim")
    engine = engine_lib.single(loss_fn, tx, lr, part=PART, ema_decay=float(cfg.train.ema_decay) or None)
    seed = int(cfg.seed)
    return stages.Stage("", steps, engine, lambda: {PART: common.init_params(den.module, seed)}, seed + 1,
                        config_lib.to_dict(cfg), part=PART, sample_fn=grid_sampler(cfg, den))


def plan_steps(cfg) -> list:
    """The train step, for `jdistill plan`: the batch is the config's, the params never made."""
    from jdistill.plan.steps import TrainStep, image_batch

    den = template(cfg)
    batch = image_batch(cfg.data.batch_size, registry.image_shape(den.module), label=bool(den.num_classes))
    return [TrainStep.of_stage(stage(cfg), batch, description=f"teacher training of {cfg.model.name}",
                               modules={"model": den.module})]


def source(cfg, den: Denoiser):
    return common.make_source(cfg.data, "train", int(cfg.data.batch_size), int(cfg.seed),
                              registry.image_shape(den.module), what=f"model {cfg.model.name}")


def setup(cfg, workdir: str | None, mesh=None) -> tuple[stages.Setup, object]:
    """(the stage ready to step, its batch source): tests drive a teacher step by step."""
    st = stage(cfg)
    mesh = mesh if mesh is not None else common.make_mesh(cfg)
    return stages.setup(st, workdir, cfg.train, mesh), source(cfg, template(cfg))


def train(cfg, workdir: str, *, progress: bool = True, mesh=None, allow_inexact_resume: bool = False):
    """Train (or resume) the teacher in ``workdir``; returns the final TrainState."""
    common.check_steps(cfg.train.steps, "train.steps")
    common.check_train_config(cfg, mesh)
    st = stage(cfg)
    src = source(cfg, template(cfg))
    return stages.run(st, workdir, cfg, lambda k: src.iterate(k), mesh=mesh, progress=progress,
                      allow_inexact=allow_inexact_resume)


def ensure_trained(config_path: str, workdir: str, overrides=(), progress: bool = True) -> str:
    """Train the teacher a config describes into ``workdir``, unless it is already trained there."""
    cfg = config_lib.load_config(config_path, overrides)
    if runs.is_finished(workdir, "", int(cfg.train.steps)):
        print(f"reusing the trained teacher in {workdir}")
    else:
        print(f"training the teacher of {config_path} into {workdir} ({cfg.train.steps} steps)")
        train(cfg, workdir, progress=progress)
    return workdir


def grid_sampler(cfg, den: Denoiser):
    """EMA samples for the progress grids: 10 per class (or 100 unconditional), fixed noise."""
    k = den.num_classes or 0
    labels = common.class_labels_for(100, k) if k else None
    grid = make_grid(den.schedule, int(cfg.sample.steps), cfg.sample.solver)
    noise = jax.random.normal(jax.random.key(1234), (100, *registry.image_shape(den.module)))
    g = float(cfg.sample.guidance_scale) if k else None

    def sample(params):
        cond = {"class_labels": labels} if k else None
        return samplers.sample_jit(den.replace(params=params), noise, cond, grid=grid, solver=cfg.sample.solver,
                                   guidance_scale=g, rng=jax.random.key(0))

    return sample


def load_denoiser(workdir: str, *, step=None, use_ema: bool = True) -> tuple[Denoiser, object]:
    """(Denoiser with trained params, config) from a teacher workdir; never trains."""
    if not runs.has_checkpoints(workdir):
        raise MissingInput(f"no checkpoint directory at {runs.checkpoint_dir(workdir)}: the teacher in {workdir} "
                           "is not trained (train it with `jdistill train --config CONFIG --workdir "
                           f"{workdir}`)")
    cfg = runs.read_config(workdir)
    params = runs.read_params(workdir, part=PART, average="ema" if use_ema else None, step=step)
    return template(cfg).replace(params=params), cfg


def make_sampler(run: runs.Run, *, steps=None, solver=None, guidance_scale=None, stochastic=False,
                 use_ema=True, **unused) -> Sampler:
    """A Sampler for the teacher run; unset options take the config's ``sample`` defaults."""
    common.refuse_options(unused, "a teacher")
    common.check_sampling(steps, solver, guidance_scale)
    if stochastic:
        raise common.InvalidArgument("--stochastic is the sampler of distilled students; a teacher samples "
                                     "with --solver ddim / ddpm / dpmpp_2m")
    den, cfg = load_denoiser(run.workdir, use_ema=use_ema)
    steps = int(steps or cfg.sample.steps)
    solver = solver or cfg.sample.solver
    k = den.num_classes
    g = float(cfg.sample.guidance_scale if guidance_scale is None else guidance_scale) if k else None
    return Sampler.for_denoiser(den, steps=steps, solver=solver, guidance_scale=g, num_classes=k,
                                description=f"teacher {solver} {steps} steps" + (f", CFG g={g:g}" if k else ""))



def member(run: runs.Run, guidance_scale: float) -> Member:
    """The teacher for composite samplers: classifier-free guidance when it is class-conditional."""
    den, _ = load_denoiser(run.workdir)
    return Member(den, guidance_scale if den.num_classes else None, {}, run_name(run))


RECIPE = Recipe("teacher", "a diffusion model trained with the denoising loss", "train", train=train,
                sampler=make_sampler, member=member, plan=plan_steps)
