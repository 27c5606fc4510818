"""What a workdir holds, read from its checkpoints alone: the recipe, its stages, their configs.

    run = open_run("runs/digits_teacher")            # a single-stage run (checkpoints/ in the workdir)
    run = open_run("runs/digits_guided")             # a multi-stage run: stage1/, steps_032/, ...
    run = open_run("runs/digits_guided/steps_004")   # one stage of it

Each stage is its own Orbax checkpoint directory, ``<workdir>/<stage>/checkpoints`` (the
stage ``""`` is the workdir's own ``checkpoints``), and stores the config that made it,
with ``recipe`` and, for a stage of a sequence, ``stage.name``. Reading a run never
trains anything and needs no code of the recipe that made it.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from jdistill import config as config_lib
from jdistill.errors import MissingInput
from jdistill.train import checkpoint as ckpt_lib


def checkpoint_dir(workdir: str, stage: str = "") -> str:
    return os.path.join(workdir, stage, "checkpoints") if stage else os.path.join(workdir, "checkpoints")


def has_checkpoints(workdir: str, stage: str = "") -> bool:
    return os.path.isdir(checkpoint_dir(workdir, stage))


def latest_step(workdir: str, stage: str = "") -> int | None:
    """The newest finished checkpoint step, read off the directory names: Orbax writes a step
    under a temporary name and renames it when complete. (No CheckpointManager: opening one is a
    collective in multi-process runs, and this is asked before every process has got there.)"""
    if not has_checkpoints(workdir, stage):
        return None
    steps = [int(d) for d in os.listdir(checkpoint_dir(workdir, stage)) if d.isdigit()]
    return max(steps) if steps else None


def is_finished(workdir: str, stage: str, steps: int) -> bool:
    """Whether the stage's latest checkpoint is its last step."""
    return latest_step(workdir, stage) == int(steps)


def read_config(workdir: str, stage: str = "") -> ml_collections.ConfigDict:
    return config_lib.from_dict(ckpt_lib.read_only(checkpoint_dir(workdir, stage)).read_config())


def read_params(workdir: str, stage: str = "", *, part: str, average: str | None = "ema", step: int | None = None):
    """The params a stage samples with: its ``average`` (e.g. the EMA) when it keeps one, else the part's."""
    return ckpt_lib.read_only(checkpoint_dir(workdir, stage)).read_params(part, average, step)


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: str  # the run's root folder
    recipe: str
    stages: tuple[str, ...]  # stages with a checkpoint directory, in the order they were made
    stage: str | None  # the stage a path pointed at (None: the whole run)
    config: ml_collections.ConfigDict  # that stage's config (or the first stage's)

    def stage_config(self, stage: str) -> ml_collections.ConfigDict:
        return read_config(self.workdir, stage)


def _stage_dirs(workdir: str) -> list[str]:
    names = [d for d in os.listdir(workdir) if has_checkpoints(workdir, d)]

    def made(d):  # the oldest checkpoint first: the order the stages were trained in
        return os.path.getmtime(checkpoint_dir(workdir, d))

    return sorted(names, key=lambda d: (made(d), d))


def open_run(path: str) -> Run:
    """The run at ``path``: a workdir with its own checkpoints, a stage folder, or a folder of stages."""
    path = os.path.abspath(os.path.normpath(os.fspath(path)))
    if not os.path.isdir(path):
        raise MissingInput(f"no checkpoint directory at {checkpoint_dir(path)}: {path} does not exist")
    if has_checkpoints(path):
        cfg = read_config(path)
        stage = (cfg.get("stage") or {}).get("name") or ""
        if stage and os.path.basename(path) == stage:
            root = os.path.dirname(path)
            return Run(root, cfg.get("recipe", "teacher"), tuple(_stage_dirs(root)), stage, cfg)
        return Run(path, cfg.get("recipe", "teacher"), ("",), None, cfg)
    stages = _stage_dirs(path)
    if not stages:
        raise MissingInput(f"no checkpoint directory at {checkpoint_dir(path)}, and no stage folders with "
                           f"checkpoints under {path}: nothing has been trained there")
    cfg = read_config(path, stages[0])
    return Run(path, cfg.get("recipe", "teacher"), tuple(stages), None, cfg)
