"""Stages: one training run = one checkpoint directory, and resumable sequences of them.

A :class:`Stage` says what is trained (an engine of named parts and their update
functions), from where (``init``: each part's initial params), for how long, what it
reads frozen, and what config it stores beside its checkpoints. :func:`run` trains it
into ``<workdir>/<name>/checkpoints``, resuming from the newest intact checkpoint (params,
optimizer, averages, step, RNG; the data position is the step; damaged steps are skipped
and moved aside, see ``train/checkpoint.py``) and refusing a resume whose config changes
what the params mean or, unless allowed, how the run gets there (``recipes/resume.py``).
:func:`run_sequence` runs stages in order, skipping finished ones: a progressive
distillation is stage 1 then one stage per halving, each built from the previous
one's params.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Generator

import jax

from jdistill.errors import DamagedCheckpointWarning
from jdistill.recipes import resume, runs
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop
from jdistill.train import mesh as mesh_lib
from jdistill.train import partitioning
from jdistill.train.engine import Engine, final_params


@dataclasses.dataclass
class Stage:
    name: str  # "" keeps the checkpoints in the workdir itself
    steps: int
    engine: Engine
    init: Callable[[], dict[str, Any]]  # part name -> initial params
    seed: int  # of the state's RNG
    config: dict  # stored beside the checkpoints
    frozen: Any = None
    identity: tuple[str, ...] = resume.IDENTITY_KEYS  # config keys a resume must not change
    exact: tuple[str, ...] = resume.EXACT_KEYS  # keys it changes only with --allow-inexact-resume
    part: str = "student"  # the part that is sampled
    sample_fn: Callable | None = None  # params -> images, for the progress grids
    jit_init: bool = True  # init straight into the shardings (random init); False places existing params


def start_or_resume(stage: Stage, checkpointer: ckpt_lib.Checkpointer | None, mesh, rules=None,
                    allow_inexact: bool = False) -> tuple[Any, list]:
    """(state, inexact resumes so far): the newest intact checkpoint restored into its shardings,
    or a fresh state. Damaged newer steps are moved aside (named in a warning) so the run can
    write them again."""
    def init():
        return stage.engine.init(stage.init(), jax.random.key(int(stage.seed)))

    abstract = jax.eval_shape(init)
    shardings = stage.engine.shardings(abstract, mesh, rules)
    if checkpointer is None or checkpointer.latest_step() is None:
        if stage.jit_init:
            return jax.jit(init, out_shardings=shardings)(), []
        return partitioning.place(jax.device_get(init()), shardings), []
    target = partitioning.abstract_like(abstract, shardings)
    stored = checkpointer.read_config()  # of the newest step whose structure is intact
    changes = resume.check(stored, stage.config, checkpointer.directory, stage.identity, stage.exact, allow_inexact)
    new = jax.jit(lambda p: stage.engine.init(p, jax.random.key(int(stage.seed))), out_shardings=shardings)
    if changes:
        newest = checkpointer.newest_intact_step()
        restored, fresh, dropped, meta = checkpointer.restore_matching(target, newest)
        state = resume.fill_fresh(restored, new(_params(stage, restored)))
        if checkpointer.restored_step != newest:  # fell back past damaged data: the changes are that step's
            changes = resume.check(checkpointer.read_config(checkpointer.restored_step), stage.config,
                                   checkpointer.directory, stage.identity, stage.exact, allow_inexact)
    else:
        state, config, meta = checkpointer.restore(target)
        fresh, dropped = [], []
        if checkpointer.restored_step != checkpointer.newest_intact_step():  # fell back: check that step's config
            changes = resume.check(config, stage.config, checkpointer.directory, stage.identity, stage.exact,
                                   allow_inexact)
    record = None
    if changes:  # only with allow_inexact (check refuses them otherwise): said loudly and recorded
        if resume.seed_changed(changes):  # the new seed's random stream from here on, as announced
            state = state.replace(rng=new(_params(stage, state)).rng)
            fresh = list(fresh) + ["rng"]
        record = resume.announce(checkpointer.directory, checkpointer.restored_step, changes,
                                 resume.groups(fresh), resume.groups(dropped))
    newer = [s for s in checkpointer.all_steps() if s > checkpointer.restored_step]
    if newer:
        moved = checkpointer.set_aside(newer)
        warnings.warn(f"resuming {checkpointer.directory} from step {checkpointer.restored_step}; moved the damaged "
                      f"step(s) aside: {', '.join(moved)} (kept for inspection, nothing deleted)",
                      DamagedCheckpointWarning, stacklevel=2)
    return state, list(meta.get(resume.RECORD_KEY, [])) + ([record] if record else [])


def _params(stage: Stage, state) -> dict:
    return {name: state.parts[name].params for name in stage.engine.parts}


@dataclasses.dataclass
class Setup:
    """A stage ready to step (tests drive it step by step)."""

    state: Any
    step_fn: Callable
    checkpointer: ckpt_lib.Checkpointer | None
    mesh: Any
    inexact_resumes: list = dataclasses.field(default_factory=list)  # carried into every checkpoint's meta

    def meta(self, step: int) -> dict:
        return {"step": int(step), resume.RECORD_KEY: self.inexact_resumes} if self.inexact_resumes else {
            "step": int(step)}


def setup(stage: Stage, workdir: str | None, train_cfg, mesh, rules=None, allow_inexact: bool = False) -> Setup:
    ckpt = None
    if workdir is not None:
        ckpt = ckpt_lib.Checkpointer(runs.checkpoint_dir(workdir, stage.name), save_every=int(train_cfg.ckpt_every),
                                     keep=int(train_cfg.keep))
    state, inexact = start_or_resume(stage, ckpt, mesh, rules, allow_inexact)
    engine = stage.engine
    if "max_update_ratio" in train_cfg:
        engine = engine.with_max_update_ratio(train_cfg.max_update_ratio)
    step_fn = engine.jit(mesh, state, stage.frozen, rules=rules)
    return Setup(state, step_fn, ckpt, mesh, inexact)


def run(stage: Stage, workdir: str, cfg, batches: Callable, *, mesh=None, progress: bool = True,
        allow_inexact: bool = False):
    """Train (or resume) ``stage`` to its last step; returns its final state (fewer steps when
    preempted: the caller stops and a restart resumes), or None when it was already finished."""
    if runs.is_finished(workdir, stage.name, stage.steps):
        directory = runs.checkpoint_dir(workdir, stage.name)
        resume.check(runs.read_config(workdir, stage.name).to_dict(), stage.config, directory, stage.identity,
                     stage.exact, allow_inexact)
        if progress:
            print(f"{os.path.join(workdir, stage.name) if stage.name else workdir}: finished ({stage.steps} steps), "
                  "reused", flush=True)
        return None
    mesh = mesh if mesh is not None else mesh_lib.from_config(cfg.mesh)
    rules = partitioning.rules_from_config(cfg.get("mesh"))
    s = setup(stage, workdir, cfg.train, mesh, rules, allow_inexact)
    stage_dir = os.path.join(workdir, stage.name) if stage.name else workdir
    sample_fn = None
    if stage.sample_fn is not None and int(cfg.train.get("sample_every", 0)):
        def sample_fn(state):
            return stage.sample_fn(final_params(stage.engine, state, stage.part))
    try:
        return loop.run(step_fn=s.step_fn, state=s.state, frozen=stage.frozen, batches=batches, mesh=mesh,
                        num_steps=stage.steps, workdir=stage_dir, checkpointer=s.checkpointer, config=stage.config,
                        log_every=int(cfg.train.log_every), sample_every=int(cfg.train.get("sample_every", 0)),
                        sample_fn=sample_fn, desc=stage.name or "train", progress=progress,
                        nonfinite=cfg.train.get("nonfinite", "stop"), meta_fn=s.meta)
    finally:
        s.checkpointer.close()  # waits for a save in flight, also when training stopped with an error


def run_sequence(stages: Generator[Stage, Any, None], workdir: str, cfg, batches: Callable, *, mesh=None,
                 progress: bool = True, allow_inexact: bool = False) -> dict:
    """Run stages in order; the generator receives each finished stage's sampling params
    (``params = yield stage``). Returns {stage name: those params}; stops early when preempted."""
    out = {}
    try:
        stage = next(stages)
        while True:
            state = run(stage, workdir, cfg, batches, mesh=mesh, progress=progress, allow_inexact=allow_inexact)
            if state is None:  # its last step exactly (never an older one): the next stage starts from it
                out[stage.name] = runs.read_params(workdir, stage.name, part=stage.part, step=stage.steps)
            elif int(jax.device_get(state.step)) < stage.steps:  # preempted: resume later
                return out
            else:
                out[stage.name] = final_params(stage.engine, state, stage.part)
            stage = stages.send(out[stage.name])
    except StopIteration:
        return out
