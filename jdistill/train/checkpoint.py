"""Orbax checkpoints of a train state, with the run's config stored beside it.

Each step directory holds three items: ``state`` (the TrainState, any sharding),
``config`` (the experiment's config as JSON, so a checkpoint says what made it) and
``meta`` (free-form JSON: data position, round of a progressive distillation, ...).
Saves are asynchronous; Orbax writes into a temporary directory and renames it only
when complete, so a run killed mid-save leaves the previous checkpoint as the latest
one. A state that is not all finite is never written.

Sampling needs only a part's params or one of its averages: :meth:`Checkpointer.read_params`
restores just that subtree, laid out from the checkpoint's own metadata, so reading a
trained model needs neither its optimizer state in memory nor the code that built it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jdistill.errors import MissingInput, UserError
from jdistill.train.trees import all_finite, combine


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing or cannot be read; says which and where."""


@contextlib.contextmanager
def quiet_absl():
    """Orbax logs a few absl warnings on every read-only open (no handler registry, no
    dataset_info); they say nothing to a user sampling a finished run."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return all_finite(tree)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()} if read_only else None
        with quiet_absl():
            self.manager = ocp.CheckpointManager(
                self.directory, item_handlers=handlers,
                options=ocp.CheckpointManagerOptions(
                    save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save,
                    create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(int(step))

    def save(self, step: int, state, config: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Save if ``step`` is on the save interval (or ``force``); returns whether it saved.
        Refuses a state holding a non-finite value: a checkpoint is always one to resume from."""
        if not (force or self.should_save(step)):
            return False
        if not bool(_all_finite(state)):
            raise CheckpointError(f"refusing to write checkpoint {step} to {self.directory}: the state holds "
                                  "non-finite values")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config or {}),
                                  meta=ocp.args.JsonSave(meta or {}))
        return self.manager.save(int(step), args=args, force=True)

    def _step(self, step):
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available: {self.all_steps()}")
        return step

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, config, meta) of ``step`` (default: latest), laid out as ``abstract_state`` says
        (ShapeDtypeStructs with shardings, from ``jax.eval_shape`` + the engine's shardings)."""
        step = self._step(step)
        try:
            with quiet_absl():
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax / tensorstore raise many kinds; name the checkpoint
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} cannot be restored: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
        return out["state"], dict(out["config"] or {}), dict(out["meta"] or {})

    def read_config(self, step: int | None = None) -> dict:
        step = self._step(step)
        try:
            with quiet_absl():
                out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"config of step {step} in {self.directory} cannot be read: {_first_line(e)}") from e
        return dict(out["config"] or {})

    def read_params(self, part: str = "student", average: str | None = "ema", step: int | None = None):
        """A part's params, or its ``average`` when the checkpoint holds one, on the default device.

        Only that subtree is read (plus the part's params to fill an average's frozen leaves)."""
        step = self._step(step)
        try:
            with quiet_absl():
                tree = self.manager.item_metadata(step)["state"].tree
        except Exception as e:
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} has no readable state "
                                  f"metadata: {_first_line(e)}") from e
        parts = tree.get("parts", {})
        if part not in parts:
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} has no part {part!r} "
                                  f"(it has {sorted(parts)})")
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def abstract(t):
            return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), t)

        want = {"parts": {part: {"params": abstract(parts[part]["params"])}}}
        use_average = bool(average) and average in tree.get("averages", {})
        if use_average:
            want["averages"] = {average: abstract(tree["averages"][average])}
        try:
            with quiet_absl():
                out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=want, restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), want),
                    partial_restore=True)))["state"]
        except Exception as e:
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} cannot be restored: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
        params = out["parts"][part]["params"]
        return combine(out["averages"][average], params) if use_average else params

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(e: Exception, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def read_only(directory: str) -> Checkpointer:
    """A read-only Checkpointer, with a plain error when the directory is not there."""
    if not os.path.isdir(directory):
        raise MissingInput(f"no checkpoint directory at {os.path.abspath(directory)}")
    return Checkpointer(directory, read_only=True)
