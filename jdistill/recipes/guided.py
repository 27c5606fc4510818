"""Guided distillation (Meng et al., CVPR 2023): stage 1, then progressive halvings.

    jdistill distill --config configs/digits_guided.py --workdir runs/digits_guided

Layout of the workdir (each stage an Orbax checkpoint directory of its own):

    stage1/checkpoints             the guidance-conditioned student (one pass = teacher with CFG)
    steps_032/checkpoints          the 32-step student, distilled from stage 1 as a 64-step teacher
    steps_016/checkpoints          ... each round from the previous one
    steps_001/checkpoints

A round is finished when its checkpoint reaches the round's step count; a
restarted run skips finished rounds and resumes the current one from its
latest checkpoint (params, optimizer, step, RNG, data position). Each round
starts from the previous student with a fresh optimizer (Salimans & Ho).

Guidance: the student reads the guidance scale g (diffusers' convention) as
its ``guidance`` condition; Meng et al.'s w = g - 1.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jdistill import config as config_lib
from jdistill.convert.engine import graft
from jdistill.denoiser import Denoiser
from jdistill.diffusion.timesteps import unit_grid
from jdistill.models import registry
from jdistill.objectives.guided import guided_loss
from jdistill.objectives.progressive import progressive_loss
from jdistill.recipes import common
from jdistill.recipes import teacher as teacher_lib
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop
from jdistill.train import state as state_lib
from jdistill.train import step as step_lib

GUIDANCE_MODULE = "guidance_embedder"
# what a stage's params depend on: resuming with other values is refused
IDENTITY_SECTIONS = ("teacher", "guidance", "stage")


def rounds(cfg) -> list[int]:
    """Student step counts of the progressive rounds: start, start / 2, ..., end."""
    n, out = int(cfg.progressive.start_steps), []
    while n >= int(cfg.progressive.end_steps):
        out.append(n)
        n //= 2
    return out


def stage_names(cfg) -> list[str]:
    return ["stage1"] + [f"steps_{n:03d}" for n in rounds(cfg)]


def round_steps(cfg, n: int) -> int:
    """Training steps of the round whose student takes ``n`` sampling steps."""
    per = dict(cfg.progressive.train_steps)
    return int(per.get(str(n), per.get("default")))


def student_template(cfg, teacher: Denoiser) -> Denoiser:
    module = teacher.module.clone(guidance_embed=True)
    return teacher.replace(module=module, params=None)


def resolve(path: str) -> str:
    """A config path as given, or relative to the repository (configs/...)."""
    if os.path.isfile(path):
        return path
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, path)


def load_teacher(cfg) -> Denoiser:
    den, _ = teacher_lib.load_denoiser(cfg.teacher.workdir, use_ema=True)
    return den


@dataclasses.dataclass
class Stage:
    """One trainable stage: its loss, where it starts from, what it reads frozen."""

    name: str
    steps: int
    loss_fn: object
    init_params: object  # () -> params
    frozen: object
    optim: object


def stage_config(cfg, stage: Stage) -> dict:
    """What a stage's checkpoint records: the run's config and which stage it is."""
    d = config_lib.to_dict(cfg)
    d["stage"] = {"name": stage.name, "steps": stage.steps}
    return d


def setup_stage(cfg, stage: Stage, workdir: str | None, mesh):
    """(state, step_fn, checkpointer) of a stage, fresh or resumed."""
    tx, schedule = common.make_optimizer(stage.optim, stage.steps)

    def init():
        return state_lib.init_state(stage.init_params(), tx, jax.random.key(int(cfg.seed) + 7),
                                    ema=float(cfg.train.ema_decay) > 0)

    ckpt = None
    if workdir is not None:
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, stage.name, "checkpoints"),
                                     save_every=int(cfg.train.ckpt_every), keep=int(cfg.train.keep))
    state = common.start_or_resume(ckpt, init, mesh, stage_config(cfg, stage), sections=IDENTITY_SECTIONS,
                                   jit_init=False)
    step_fn = step_lib.make_train_step(stage.loss_fn, tx, mesh=mesh, state=state, frozen=stage.frozen,
                                       ema_decay=float(cfg.train.ema_decay) or None, lr_schedule=schedule)
    return state, step_fn, ckpt


def final_params(state):
    return state.ema_params if state.ema_params is not None else state.params


def stage1(cfg, teacher: Denoiser, student: Denoiser) -> Stage:
    def init_params():
        fresh = common.init_params(student.module, int(cfg.seed))
        return graft(teacher.params, fresh, new=(GUIDANCE_MODULE,))

    loss = guided_loss(student, teacher.replace(params=None), scale_range=tuple(cfg.guidance.scale_range),
                       weighting=cfg.stage1.weighting)
    return Stage("stage1", int(cfg.stage1.steps), loss, init_params, teacher.params, cfg.stage1.optim)


def halving(cfg, n: int, student: Denoiser, previous_params) -> Stage:
    loss = progressive_loss(student, student, num_steps=n, scale_range=tuple(cfg.guidance.scale_range),
                            weighting=cfg.progressive.weighting)
    return Stage(f"steps_{n:03d}", round_steps(cfg, n), loss, lambda: previous_params, previous_params,
                 cfg.progressive.optim)


def stages(cfg, teacher: Denoiser):
    """Yield the stages in order; each halving is built from the finished previous stage's params,
    which the caller sends back in (``params = yield stage``)."""
    student = student_template(cfg, teacher)
    params = yield stage1(cfg, teacher, student)
    for n in rounds(cfg):
        params = yield halving(cfg, n, student, params)


def train(cfg, workdir: str, *, progress: bool = True, mesh=None):
    """Stage 1, then every halving; returns {stage name: final params}."""
    mesh = mesh if mesh is not None else common.make_mesh(cfg)
    if cfg.teacher.get("config"):
        teacher_lib.ensure_trained(resolve(cfg.teacher.config), cfg.teacher.workdir, progress=progress)
    teacher = load_teacher(cfg)
    source = common.make_source(cfg.data, "train", int(cfg.data.batch_size), int(cfg.seed),
                                registry.image_shape(teacher.module), what="the teacher")
    student = student_template(cfg, teacher)
    out = {}
    gen = stages(cfg, teacher)
    stage = next(gen)
    while True:
        state, step_fn, ckpt = setup_stage(cfg, stage, workdir, mesh)
        state = loop.run(step_fn=step_fn, state=state, frozen=stage.frozen, batches=lambda k: source.iterate(k),
                         mesh=mesh, num_steps=stage.steps, workdir=os.path.join(workdir, stage.name),
                         checkpointer=ckpt, config=stage_config(cfg, stage), log_every=int(cfg.train.log_every),
                         sample_every=int(cfg.train.sample_every), desc=stage.name, progress=progress,
                         sample_fn=grid_sampler(cfg, student, stage.name))
        ckpt.close()
        if int(jax.device_get(state.step)) < stage.steps:  # preempted: stop here, resume later
            return out
        out[stage.name] = final_params(state)
        try:
            stage = gen.send(out[stage.name])
        except StopIteration:
            return out


def student_steps(stage_name: str) -> int | None:
    return int(stage_name.split("_")[1]) if stage_name.startswith("steps_") else None


def grid_sampler(cfg, student: Denoiser, stage_name: str):
    n = student_steps(stage_name) or int(cfg.sample.steps)
    k = registry.num_classes(student.module)
    labels = common.class_labels_for(100, k)
    grid = unit_grid(student.schedule, n)
    noise = jax.random.normal(jax.random.key(1234), (100, *registry.image_shape(student.module)))
    g = np.full((100,), float(cfg.sample.guidance_scale), np.float32)

    def sample(state):
        from jdistill.sampling import samplers

        den = student.replace(params=final_params(state))
        return samplers.sample_jit(den, noise, {"class_labels": labels, "guidance": g}, grid=grid, solver="ddim")

    return sample


def load_student(workdir: str, stage_name: str):
    """(student Denoiser with trained params, config) of a finished or running stage."""
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, stage_name, "checkpoints"), read_only=True)
    cfg = config_lib.from_dict(ck.read_config())
    teacher_cfg = config_lib.from_dict(ckpt_lib.Checkpointer(
        common.checkpoint_dir(cfg.teacher.workdir), read_only=True).read_config())
    template = common.denoiser_template(teacher_cfg.model, teacher_cfg.diffusion)
    student = student_template(cfg, template)
    steps = int(cfg.stage.steps)
    tx, _ = common.make_optimizer(cfg.stage1.optim if stage_name == "stage1" else cfg.progressive.optim, steps)

    def init():
        return state_lib.init_state(common.init_params(student.module, 0), tx, jax.random.key(0),
                                    ema=float(cfg.train.ema_decay) > 0)

    abstract = jax.eval_shape(init)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _, _ = ck.restore(ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: dev, abstract)))
    return student.replace(params=final_params(state)), cfg


def make_sampler(workdir: str, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True):
    """The distilled student for ``steps`` sampling steps: the round trained for that count, or the
    stage-1 student (a full-length sampler) when no round has it. DDIM, or with ``stochastic`` Meng
    et al.'s N-step stochastic sampler. One model call per step: guidance is an input, not CFG."""
    from jdistill.recipes.sample import Sampler

    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "stage1", "checkpoints"), read_only=True)
    cfg = config_lib.from_dict(ck.read_config())
    steps = int(steps or cfg.sample.steps)
    name = f"steps_{steps:03d}"
    if not os.path.isdir(os.path.join(workdir, name, "checkpoints")):
        name = "stage1"
    if solver not in (None, "ddim"):
        raise ValueError(f"a distilled student samples with ddim (or --stochastic), not {solver!r}")
    den, _ = load_student(workdir, name)
    g = float(cfg.sample.guidance_scale if guidance_scale is None else guidance_scale)
    mode = "stochastic" if stochastic else "ddim"
    return Sampler.for_denoiser(den, steps=steps, solver=mode, grid=unit_grid(den.schedule, steps),
                                num_classes=registry.num_classes(den.module), extra_cond={"guidance": g},
                                description=f"student ({name}) {mode} {steps} steps, g={g:g}")
