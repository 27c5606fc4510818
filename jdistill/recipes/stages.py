"""Stages: one training run = one checkpoint directory, and resumable sequences of them.

A :class:`Stage` says what is trained (an engine of named parts and their update
functions), from where (``init``: each part's initial params), for how long, what it
reads frozen, and what config it stores beside its checkpoints. :func:`run` trains it
into ``<workdir>/<name>/checkpoints``, resuming from the latest checkpoint (params,
optimizer, averages, step, RNG; the data position is the step) and refusing a resume
whose config differs in a section that changes what the params mean.
:func:`run_sequence` runs stages in order, skipping finished ones: a progressive
distillation is stage 1 then one stage per halving, each built from the previous
one's params.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Generator

import jax

from jdistill import config as config_lib
from jdistill.recipes import runs
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop
from jdistill.train import mesh as mesh_lib
from jdistill.train import partitioning
from jdistill.train.engine import Engine, final_params

# Config sections that define what a checkpoint's params mean (the defaults of a model trained
# from scratch): resuming with other values would restore weights into a different network.
IDENTITY_SECTIONS = ("model", "diffusion")


@dataclasses.dataclass
class Stage:
    name: str  # "" keeps the checkpoints in the workdir itself
    steps: int
    engine: Engine
    init: Callable[[], dict[str, Any]]  # part name -> initial params
    seed: int  # of the state's RNG
    config: dict  # stored beside the checkpoints
    frozen: Any = None
    identity: tuple[str, ...] = IDENTITY_SECTIONS
    part: str = "student"  # the part that is sampled
    sample_fn: Callable | None = None  # params -> images, for the progress grids
    jit_init: bool = True  # init straight into the shardings (random init); False places existing params


def _plain(d):
    """JSON's view of a config value: tuples are lists (a stored config comes back that way)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def check_same_identity(stored: dict, current: dict, directory: str, sections) -> None:
    """Refuse to resume a checkpoint made by a different network, noise process or stage."""
    for section in sections:
        a, b = _plain(stored.get(section)), _plain(current.get(section))
        if a is None or b is None:
            continue
        if a != b:
            keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else [None]
            diffs = [k for k in keys if k is None or a.get(k) != b.get(k)]
            detail = ", ".join(f"{section}.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}" if k is not None
                               else f"{section}: checkpoint {a!r} vs config {b!r}" for k in diffs)
            raise config_lib.ConfigError(f"the checkpoint in {directory} was made with a different "
                                         f"{section} config ({detail}); use a new workdir or the same config")


def start_or_resume(stage: Stage, checkpointer: ckpt_lib.Checkpointer | None, mesh, rules=None):
    """The latest checkpoint restored into its shardings, or a fresh state."""
    def init():
        return stage.engine.init(stage.init(), jax.random.key(int(stage.seed)))

    abstract = jax.eval_shape(init)
    shardings = stage.engine.shardings(abstract, mesh, rules)
    if checkpointer is not None and checkpointer.latest_step() is not None:
        check_same_identity(checkpointer.read_config(), stage.config, checkpointer.directory, stage.identity)
        state, _, _ = checkpointer.restore(partitioning.abstract_like(abstract, shardings))
        return state
    if stage.jit_init:
        return jax.jit(init, out_shardings=shardings)()
    return partitioning.place(jax.device_get(init()), shardings)


@dataclasses.dataclass
class Setup:
    """A stage ready to step (tests drive it step by step)."""

    state: Any
    step_fn: Callable
    checkpointer: ckpt_lib.Checkpointer | None
    mesh: Any


def setup(stage: Stage, workdir: str | None, train_cfg, mesh, rules=None) -> Setup:
    ckpt = None
    if workdir is not None:
        ckpt = ckpt_lib.Checkpointer(runs.checkpoint_dir(workdir, stage.name), save_every=int(train_cfg.ckpt_every),
                                     keep=int(train_cfg.keep))
    state = start_or_resume(stage, ckpt, mesh, rules)
    step_fn = stage.engine.jit(mesh, state, stage.frozen, rules=rules)
    return Setup(state, step_fn, ckpt, mesh)


def run(stage: Stage, workdir: str, cfg, batches: Callable, *, mesh=None, progress: bool = True):
    """Train (or resume) ``stage`` to its last step; returns its final state (fewer steps when
    preempted: the caller stops and a restart resumes), or None when it was already finished."""
    if runs.is_finished(workdir, stage.name, stage.steps):
        directory = runs.checkpoint_dir(workdir, stage.name)
        check_same_identity(runs.read_config(workdir, stage.name).to_dict(), stage.config, directory, stage.identity)
        if progress:
            print(f"{os.path.join(workdir, stage.name) if stage.name else workdir}: finished ({stage.steps} steps), "
                  "reused", flush=True)
        return None
    mesh = mesh if mesh is not None else mesh_lib.from_config(cfg.mesh)
    rules = partitioning.rules_from_config(cfg.get("mesh"))
    s = setup(stage, workdir, cfg.train, mesh, rules)
    stage_dir = os.path.join(workdir, stage.name) if stage.name else workdir
    sample_fn = None
    if stage.sample_fn is not None and int(cfg.train.get("sample_every", 0)):
        def sample_fn(state):
            return stage.sample_fn(final_params(stage.engine, state, stage.part))
    state = loop.run(step_fn=s.step_fn, state=s.state, frozen=stage.frozen, batches=batches, mesh=mesh,
                     num_steps=stage.steps, workdir=stage_dir, checkpointer=s.checkpointer, config=stage.config,
                     log_every=int(cfg.train.log_every), sample_every=int(cfg.train.get("sample_every", 0)),
                     sample_fn=sample_fn, desc=stage.name or "train", progress=progress,
                     nonfinite=cfg.train.get("nonfinite", "stop"))
    s.checkpointer.close()
    return state


def run_sequence(stages: Generator[Stage, Any, None], workdir: str, cfg, batches: Callable, *, mesh=None,
                 progress: bool = True) -> dict:
    """Run stages in order; the generator receives each finished stage's sampling params
    (``params = yield stage``). Returns {stage name: those params}; stops early when preempted."""
    out = {}
    try:
        stage = next(stages)
        while True:
            state = run(stage, workdir, cfg, batches, mesh=mesh, progress=progress)
            if state is None:
                out[stage.name] = runs.read_params(workdir, stage.name, part=stage.part)
            elif int(jax.device_get(state.step)) < stage.steps:  # preempted: resume later
                return out
            else:
                out[stage.name] = final_params(stage.engine, state, stage.part)
            stage = stages.send(out[stage.name])
    except StopIteration:
        return out
