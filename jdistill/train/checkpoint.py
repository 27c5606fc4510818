"""Orbax checkpoints of a train state, with the run's config stored beside it.

Each step directory holds three items: ``state`` (the TrainState, any sharding),
``config`` (the experiment's config as JSON, so a checkpoint says what made it) and
``meta`` (free-form JSON: data position, round of a progressive distillation, ...).
Saves are asynchronous; Orbax writes into a temporary directory and renames it only
when complete, so a run killed mid-save leaves the previous checkpoint as the latest
one. A state that is not all finite is never written.

Every read checks what it reads (``train/integrity.py``): a step whose files are missing,
truncated or overwritten, whose commit marker is gone, or whose arrays read back other
than they were saved (each save stores a fingerprint per array in ``meta``) is damaged.
Reading the latest step falls back to the newest intact one, with a warning naming the
damaged step and file; nothing is deleted. (Resuming training moves the damaged steps
aside, to ``<step>.damaged``, so that the run can write those steps again.)

Sampling needs only a part's params or one of its averages: :meth:`Checkpointer.read_params`
restores just that subtree, laid out from the checkpoint's own metadata, so reading a
trained model needs neither its optimizer state in memory nor the code that built it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import warnings
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jdistill.errors import DamagedCheckpointWarning, MissingInput, UserError
from jdistill.train import integrity
from jdistill.train.integrity import FINGERPRINT_KEY, Damage
from jdistill.train.trees import all_finite, combine


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged or cannot be read; says which and where."""


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


@contextlib.contextmanager
def quiet_failed_reads():
    """When one array of a restore cannot be read, Orbax abandons the reads of all the others,
    and each abandoned coroutine prints its TensorStore spec (kilobytes each) as it is
    collected. The failure that matters is raised and diagnosed; those echoes are dropped."""
    previous = sys.unraisablehook

    def hook(unraisable):
        text = str(unraisable.exc_value)
        if "Encountered error while reading array" in text or "Event loop is closed" in text:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


@jax.jit
def _all_finite(tree) -> jax.Array:
    return all_finite(tree)


def _strip(meta) -> dict:
    """The meta a caller wrote (the integrity fingerprint is the checkpointer's own)."""
    return {k: v for k, v in dict(meta or {}).items() if k != FINGERPRINT_KEY}


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self.read_only = read_only
        self.skipped: list[Damage] = []  # damaged steps the last read passed over, newest first
        self.restored_step: int | None = None
        self._reader = None
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

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def save(self, step: int, state, config: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Save if ``step`` is on the save interval (or ``force``); returns whether it saved.
        Refuses a state holding a non-finite value: a checkpoint is always one to resume from."""
        if not (force or self.should_save(step)):
            return False
        if not bool(_all_finite(state)):
            raise CheckpointError(f"refusing to write checkpoint {step} to {self.directory}: the state holds "
                                  "non-finite values")
        meta = dict(meta or {}, **{FINGERPRINT_KEY: integrity.fingerprint(state)})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config or {}),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(int(step), args=args, force=True)

    def _step(self, step):
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available: {self.all_steps()}")
        return step

    # -- integrity -----------------------------------------------------------------------
    def inspect(self, step: int) -> Damage | None:
        """What is damaged in step ``step``, read without its array data (None: nothing found)."""
        return integrity.inspect(self.step_dir(step), int(step))

    def newest_intact_step(self) -> int | None:
        """The newest step whose structure is intact (see :meth:`inspect`); None when there is none."""
        return next((s for s in sorted(self.all_steps(), reverse=True) if self.inspect(s) is None), None)

    def _fingerprint_damage(self, step: int, tree, meta) -> Damage | None:
        bad = integrity.compare_fingerprints(tree, (meta or {}).get(FINGERPRINT_KEY))
        if bad is None:
            return None
        try:
            values, _ = integrity.value_files(os.path.join(self.step_dir(step), "state"))
            where = "state/" + sorted({f for f, _, _ in values[bad]})[0]
        except Exception:
            where = "state"
        return Damage(step, where, f"array {bad} reads back other than it was saved (its fingerprint differs): "
                                   "the data is corrupt")

    def _newest_intact(self, step: int | None, read: Callable[[int], Any], verify: Callable[[int, Any], Any]):
        """(step, read(step)) of ``step``, or by default of the newest step that is intact: its
        structure inspected, its read succeeding and ``verify(step, out)`` finding nothing. Damaged
        steps are skipped with a warning (kept in ``self.skipped``); none is deleted."""
        if step is None:
            candidates = sorted(self.all_steps(), reverse=True)
            if not candidates:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        else:
            candidates = [self._step(step)]
        damaged = []
        for s in candidates:
            damage = self.inspect(s)
            if damage is None:
                try:
                    with quiet_absl(), quiet_failed_reads():
                        out = read(s)
                except UserError:
                    raise
                except Exception as e:  # orbax / tensorstore raise many kinds: damage, or something else?
                    damage = integrity.diagnose(e, self.step_dir(s), s)
                    if damage is None:
                        raise CheckpointError(f"checkpoint at step {s} in {self.directory} cannot be restored: "
                                              f"{type(e).__name__}: {_first_line(e)}") from e
                else:
                    damage = verify(s, out)
            if damage is None:
                self.skipped = damaged
                for d in damaged:
                    warnings.warn(f"checkpoint step {d.step} in {self.directory} is damaged ({d.file}: {d.problem}); "
                                  f"using step {s}, the newest intact one (nothing was deleted)",
                                  DamagedCheckpointWarning, stacklevel=3)
                return s, out
            damaged.append(damage)
        if step is not None:
            raise CheckpointError(f"checkpoint in {self.directory} is damaged: {damaged[0]}")
        raise self._none_intact(damaged)

    def _none_intact(self, damaged) -> CheckpointError:
        return CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(str(d) for d in damaged)
                               + ". Nothing was deleted; train into a new workdir, or move the damaged steps aside")

    def set_aside(self, steps) -> list[str]:
        """Rename damaged steps to ``<step>.damaged`` (kept for inspection, no longer a step), so a
        resumed run can write those steps again; returns the new paths."""
        moved = []
        for step in steps:
            target = self.step_dir(step) + ".damaged"
            n = 1
            while os.path.exists(target):
                n += 1
                target = f"{self.step_dir(step)}.damaged{n}"
            if jax.process_index() == 0:
                os.rename(self.step_dir(step), target)
            moved.append(target)
        if moved:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("jdistill:set_aside_damaged_steps")
            self.manager.reload()
        return moved

    # -- reads -----------------------------------------------------------------------------
    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, config, meta) of ``step`` (default: the newest intact step), laid out as
        ``abstract_state`` says (ShapeDtypeStructs with shardings, from ``jax.eval_shape`` + the
        engine's shardings)."""
        def read(s):
            return self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))

        self.restored_step, out = self._newest_intact(
            step, read, lambda s, o: self._fingerprint_damage(s, o["state"], o["meta"]))
        return out["state"], dict(out["config"] or {}), _strip(out["meta"])

    def read_config(self, step: int | None = None) -> dict:
        """The config stored with ``step`` (default: the newest step whose structure is intact)."""
        if step is not None:
            step = self._step(step)
        else:
            self._step(None)  # "no checkpoint" when there is none
            step = self.newest_intact_step()
            if step is None:
                raise self._none_intact([self.inspect(s) for s in sorted(self.all_steps(), reverse=True)])
        try:
            with quiet_absl():
                out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"config of step {step} in {self.directory} cannot be read: {_first_line(e)}") from e
        return dict(out["config"] or {})

    def _reading_manager(self):
        """Partial reads go through a read-only manager (PyTree handlers), this one's or its own."""
        if self.read_only:
            return self.manager
        if self._reader is None:
            self._reader = Checkpointer(self.directory, read_only=True)
        return self._reader.manager

    def _read_subset(self, step: int, want) -> tuple[Any, dict]:
        """The arrays of ``want`` (a nested dict of ShapeDtypeStructs with shardings) and the meta."""
        manager = self._reading_manager()
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=want, restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), want),
            partial_restore=True)))["state"]
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return state, dict(meta or {})

    def stored_arrays(self, step: int) -> dict[str, Any]:
        """{array name: metadata (shape, dtype)} of the state stored at ``step``."""
        try:
            with quiet_absl():
                tree = self._reading_manager().item_metadata(step)["state"].tree
        except Exception as e:
            raise CheckpointError(f"checkpoint at step {step} in {self.directory} has no readable state "
                                  f"metadata: {_first_line(e)}") from e
        return tree

    def read_params(self, part: str = "student", average: str | None = "ema", step: int | None = None):
        """A part's params, or its ``average`` when the checkpoint holds one, on the default device.

        Only that subtree is read (plus the part's params to fill an average's frozen leaves), from
        ``step`` or by default the newest intact step."""
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def abstract(t):
            return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), t)

        def read(s):
            tree = self.stored_arrays(s)
            parts = tree.get("parts", {})
            if part not in parts:
                raise CheckpointError(f"checkpoint at step {s} in {self.directory} has no part {part!r} "
                                      f"(it has {sorted(parts)})")
            want = {"parts": {part: {"params": abstract(parts[part]["params"])}}}
            if bool(average) and average in tree.get("averages", {}):
                want["averages"] = {average: abstract(tree["averages"][average])}
            return self._read_subset(s, want)

        def verify(s, out):
            return self._fingerprint_damage(s, out[0], out[1])

        _, (out, _) = self._newest_intact(step, read, verify)
        params = out["parts"][part]["params"]
        return combine(out["averages"][average], params) if "averages" in out else params

    def restore_matching(self, abstract_state, step: int) -> tuple[Any, list[str], list[str], dict]:
        """(``abstract_state`` filled from ``step`` wherever the checkpoint holds an array of the same
        name, shape and dtype, None elsewhere; the names left None; the stored names not restored;
        the meta). For a resume that changes the state's structure on purpose (a new EMA, another
        optimizer chain)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
        target = {integrity.array_name(kp): leaf for kp, leaf in flat}
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def wanted(kp, m):
            # the read mirrors the stored tree (an optimizer's tuples are lists there, and a list
            # cannot be read in part); what the target has no use for is read to one device, dropped
            leaf = target.get(integrity.array_name(kp))
            if leaf is not None and tuple(m.shape) == tuple(leaf.shape) and m.dtype == leaf.dtype:
                return leaf
            return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev)

        def read(s):
            want = jax.tree_util.tree_map_with_path(wanted, self.stored_arrays(s))
            return want, self._read_subset(s, want)

        self.restored_step, (want, (got, meta)) = self._newest_intact(
            step, read, lambda s, out: self._fingerprint_damage(s, out[1][0], out[1][1]))
        read_values = {integrity.array_name(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(got)[0]}
        kept = {integrity.array_name(kp) for kp, leaf in jax.tree_util.tree_flatten_with_path(want)[0]
                if leaf is target.get(integrity.array_name(kp))}
        values = [read_values[name] if name in kept else None for name in target]
        missing = [name for name in target if name not in kept]
        return (jax.tree_util.tree_unflatten(treedef, values), missing, sorted(set(read_values) - kept),
                _strip(meta))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
        if self._reader is not None:
            self._reader.close()

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
