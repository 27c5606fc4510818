"""Teacher training: a diffusion model trained with the denoising loss, plus sampling from it.

    jdistill train --config configs/digits_teacher.py --workdir runs/digits_teacher

Config sections read here: ``seed``, ``model`` (registry fields), ``diffusion``
(schedule kind + prediction), ``data``, ``loss``, ``optim``, ``train``,
``mesh``, ``sample`` (the grids written while training and the defaults of
``jdistill sample``).
"""

from __future__ import annotations

import dataclasses
import os

import jax

from jdistill import config as config_lib
from jdistill.denoiser import Denoiser
from jdistill.objectives.denoising import denoising_loss
from jdistill.recipes import common
from jdistill.sampling import samplers
from jdistill.diffusion.timesteps import make_grid
from jdistill.models import registry
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop
from jdistill.train import state as state_lib
from jdistill.train import step as step_lib


def state_init_fn(cfg):
    """The function that makes a fresh TrainState for this config (also fixes its structure)."""
    module = registry.build_model(cfg.model)
    tx, _ = common.make_optimizer(cfg.optim, int(cfg.train.steps))

    def init():
        params = common.init_params(module, int(cfg.seed))
        return state_lib.init_state(params, tx, jax.random.key(int(cfg.seed) + 1), ema=cfg.train.ema_decay > 0)

    return init


@dataclasses.dataclass
class Setup:
    """Everything a teacher run is made of, before the loop starts (tests drive it step by step)."""

    template: Denoiser
    mesh: object
    source: object
    state: object
    step_fn: object
    checkpointer: ckpt_lib.Checkpointer | None


def setup(cfg, workdir: str | None, mesh=None) -> Setup:
    mesh = mesh if mesh is not None else common.make_mesh(cfg)
    template = common.denoiser_template(cfg.model, cfg.diffusion)
    source = common.make_source(cfg.data, "train", int(cfg.data.batch_size), int(cfg.seed),
                                registry.image_shape(template.module), what=f"model {cfg.model.name}")
    loss_fn = denoising_loss(template, weighting=cfg.loss.weighting, cond_drop_prob=float(cfg.loss.cond_drop_prob),
                             min_snr_gamma=float(cfg.loss.get("min_snr_gamma", 5.0)),
                             time_sampling=cfg.loss.get("time_sampling", "uniform"))
    tx, schedule = common.make_optimizer(cfg.optim, int(cfg.train.steps))
    init = state_init_fn(cfg)
    ckpt = None
    if workdir is not None:
        ckpt = ckpt_lib.Checkpointer(common.checkpoint_dir(workdir), save_every=int(cfg.train.ckpt_every),
                                     keep=int(cfg.train.keep))
    state = common.start_or_resume(ckpt, init, mesh, config_lib.to_dict(cfg))
    step_fn = step_lib.make_train_step(loss_fn, tx, mesh=mesh, state=state,
                                       ema_decay=float(cfg.train.ema_decay) or None, lr_schedule=schedule)
    return Setup(template, mesh, source, state, step_fn, ckpt)


def train(cfg, workdir: str, *, progress: bool = True):
    """Train (or resume) the teacher in ``workdir``; returns the final TrainState."""
    s = setup(cfg, workdir)
    sample_fn = grid_sampler(cfg, s.template) if cfg.train.sample_every else None
    state = loop.run(step_fn=s.step_fn, state=s.state, frozen=None, batches=lambda k: s.source.iterate(k),
                     mesh=s.mesh, num_steps=int(cfg.train.steps), workdir=workdir, checkpointer=s.checkpointer,
                     config=config_lib.to_dict(cfg), log_every=int(cfg.train.log_every),
                     sample_every=int(cfg.train.sample_every), sample_fn=sample_fn, desc="teacher", progress=progress)
    s.checkpointer.close()
    return state


def is_trained(workdir: str, steps: int) -> bool:
    """Whether ``workdir`` (a teacher, or one stage of a distillation) holds a finished run of ``steps``."""
    d = common.checkpoint_dir(workdir)
    return os.path.isdir(d) and ckpt_lib.Checkpointer(d, read_only=True).latest_step() == steps


def ensure_trained(config_path: str, workdir: str, overrides=(), progress: bool = True) -> str:
    """Train the teacher a config describes into ``workdir``, unless it is already trained there."""
    cfg = config_lib.load_config(config_path, overrides)
    if is_trained(workdir, int(cfg.train.steps)):
        print(f"reusing the trained teacher in {workdir}")
    else:
        print(f"training the teacher of {config_path} into {workdir} ({cfg.train.steps} steps)")
        train(cfg, workdir, progress=progress)
    return workdir


def grid_sampler(cfg, template):
    """EMA samples for the progress grids: 10 per class (or 100 unconditional), fixed noise."""
    k = registry.num_classes(template.module) or 0
    labels = common.class_labels_for(100, k) if k else None
    grid = make_grid(template.schedule, int(cfg.sample.steps), cfg.sample.solver)
    noise = jax.random.normal(jax.random.key(1234), (100, *registry.image_shape(template.module)))
    g = float(cfg.sample.guidance_scale) if k else None

    def sample(state):
        params = state.ema_params if state.ema_params is not None else state.params
        cond = {"class_labels": labels} if k else None
        return samplers.sample_jit(template.replace(params=params), noise, cond, grid=grid, solver=cfg.sample.solver,
                                   guidance_scale=g, rng=jax.random.key(0))

    return sample


def load_denoiser(workdir: str, *, step=None, use_ema: bool = True):
    """(Denoiser with trained params, config) from a teacher workdir."""
    cfg, params = common.load_trained(workdir, state_init_fn, step=step, use_ema=use_ema)
    return common.denoiser_template(cfg.model, cfg.diffusion).replace(params=params), cfg


def class_balanced_labels(den, num: int):
    k = registry.num_classes(den.module)
    return common.class_labels_for(num, k) if k else None



def make_sampler(workdir: str, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True):
    """A :class:`~jdistill.recipes.sample.Sampler` for the teacher in ``workdir``; unset options take
    the config's ``sample`` defaults. ``stochastic`` is for distilled students only."""
    from jdistill.recipes.sample import Sampler

    if stochastic:
        raise ValueError("--stochastic is the sampler of distilled students; a teacher samples with "
                         "--solver ddim / ddpm / dpmpp_2m")
    den, cfg = load_denoiser(workdir, use_ema=use_ema)
    steps = int(steps or cfg.sample.steps)
    solver = solver or cfg.sample.solver
    k = registry.num_classes(den.module)
    g = float(cfg.sample.guidance_scale if guidance_scale is None else guidance_scale) if k else None
    return Sampler.for_denoiser(den, steps=steps, solver=solver, guidance_scale=g, num_classes=k,
                                description=f"teacher {solver} {steps} steps" + (f", CFG g={g:g}" if k else ""))
