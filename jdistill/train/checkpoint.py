"""Orbax checkpoints of a train state, with the run's config stored beside it.

Each step directory holds three items: ``state`` (the TrainState, any
sharding), ``config`` (the experiment's config as JSON, so a checkpoint
says what made it) and ``meta`` (free-form JSON: data position, round of a
progressive distillation, ...). Saves are asynchronous; Orbax writes into
a temporary directory and renames it only when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read; says which and where."""


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save,
                create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, config: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Save if ``step`` is on the save interval (or ``force``); returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config or {}),
                                  meta=ocp.args.JsonSave(meta or {}))
        return self.manager.save(int(step), args=args, force=force)

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
        (ShapeDtypeStructs with shardings, from ``jax.eval_shape`` + ``state_shardings``)."""
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax / tensorstore raise many kinds; name the checkpoint
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} cannot be restored: "
                                  f"{type(e).__name__}: {e}") from e
        return out["state"], dict(out["config"] or {}), dict(out["meta"] or {})

    def read_config(self, step: int | None = None) -> dict:
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"config of step {step} in {self.directory} cannot be read: {e}") from e
        return dict(out["config"] or {})

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of ``tree``, carrying ``shardings`` (a matching tree) when given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
