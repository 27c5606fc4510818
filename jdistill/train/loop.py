"""The training loop every recipe runs: progress bar, metrics, sample grids, checkpoints, resume.

The loop owns no model knowledge. It is given a compiled step, the state
(fresh or restored), a batch source that can start at any step (so the
data position resumes exactly), and optional hooks for samples. Metrics go
to ``metrics.jsonl`` (and TensorBoard when tensorboardX is installed);
sample grids to ``samples/step_XXXXXXX.png``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from jdistill import images as images_lib
from jdistill.errors import UserError
from jdistill.models import layers
from jdistill.train import mesh as mesh_lib


class MetricWriter:
    """JSONL always; TensorBoard as well when tensorboardX is importable. Only process 0 writes."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", resume_from: int | None = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if resume_from is not None and os.path.isfile(self.path):
                self._drop_after(resume_from)
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def _drop_after(self, step: int):
        """Rows logged after the checkpoint a run resumes from (a killed session's last steps) are
        about to be logged again: keep one row per step, the resumed run's."""
        rows = read_metrics(self.path, partial_ok=True)
        kept = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(kept) < len(rows) or not _complete(self.path):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict, **extra):
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str, partial_ok: bool = False) -> list[dict]:
    """The rows of a metrics file; ``partial_ok``: skip a last row a kill cut off mid-write."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not (partial_ok and i == len(lines) - 1):
                raise
    return rows


def _complete(path: str) -> bool:
    """Whether the file's last row parses (a kill can cut the last write short)."""
    try:
        read_metrics(path)
        return True
    except json.JSONDecodeError:
        return False


class _Preemption:
    """SIGTERM (how TPU VMs and schedulers announce preemption) -> save and stop at the next step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class NonFiniteError(UserError):
    """Training produced a non-finite loss, gradient or param, or a divergent update, and the config says stop."""


NONFINITE_POLICIES = ("skip", "stop")


def run(*, step_fn: Callable, state, frozen, batches: Callable[[int], Iterator[dict]], mesh, num_steps: int,
        workdir: str, checkpointer=None, config: dict | None = None, meta_fn: Callable[[int], dict] | None = None,
        log_every: int = 50, sample_every: int = 0, sample_fn: Callable | None = None, desc: str = "train",
        progress: bool = True, nonfinite: str = "stop"):
    """Train from ``state.step`` to ``num_steps``; returns the final state.

    ``batches(start_step)`` yields process-local numpy batches for steps
    start_step, start_step + 1, ...; ``sample_fn(state)`` returns images (N,H,W,C)
    in [-1, 1] or uint8 for a grid.

    Non-finite updates never reach the state (the engine's guard keeps the old params
    and counts them); ``nonfinite="stop"`` raises :class:`NonFiniteError` at the next
    log or checkpoint step after one, before anything is saved, "skip" trains on.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise UserError(f"train.nonfinite={nonfinite!r}; expected one of {NONFINITE_POLICIES}")
    start = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, resume_from=start)
    it = batches(start)
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True)
    t0, last = time.perf_counter(), start
    t_start = t0
    step = start
    skipped = int(jax.device_get(state.skipped))
    with _Preemption() as preempt:
        for step in range(start, num_steps):
            batch = mesh_lib.global_batch(next(it), mesh)
            state, metrics = step_fn(state, frozen, batch)
            done = step + 1
            final = preempt.requested or done == num_steps
            saving = checkpointer is not None and (final or checkpointer.should_save(done))
            if done % log_every == 0 or final or saving:
                m = jax.device_get(metrics)
                now_skipped = int(m["nonfinite_skipped"])
                if now_skipped > skipped:
                    where = (f"between steps {last + 1} and {done}" if done > last + 1 else f"at step {done}")
                    if nonfinite == "stop":
                        if checkpointer is not None:
                            checkpointer.wait()  # a save in flight is then complete: the one named below
                        good = checkpointer.latest_step() if checkpointer is not None else None
                        where_good = (f"step {good} in {checkpointer.directory}" if good is not None else "none")
                        raise NonFiniteError(
                            f"{desc}: {now_skipped - skipped} update(s) {where} had a non-finite loss, gradient "
                            f"or param, or diverged (an update over train.max_update_ratio times its part's norm), "
                            f"and were not applied; stopping (train.nonfinite='stop'). Last good "
                            f"checkpoint: {where_good}. Lower the learning rate (resuming with another optim "
                            "config needs --allow-inexact-resume) or set --config.train.nonfinite=skip to train on")
                    print(f"{desc}: skipped {now_skipped - skipped} non-finite or divergent update(s) {where}",
                          flush=True)
                    skipped = now_skipped
                if done % log_every == 0 or final:
                    dt = time.perf_counter() - t0
                    writer.write(done, m, steps_per_s=(done - last) / max(dt, 1e-9))
                    shown = next((k for k in m if k == "loss" or k.endswith("/loss")), None)
                    if shown:
                        bar.set_postfix(loss=f"{float(m[shown]):.4f}")
                    t0, last = time.perf_counter(), done
            bar.update(1)
            if sample_fn is not None and sample_every and done % sample_every == 0:
                save_samples(workdir, done, sample_fn(state))
            if saving:
                checkpointer.save(done, state, config, meta_fn(done) if meta_fn else {"step": done}, force=True)
            if preempt.requested:
                break
    bar.close()
    writer.close()
    if checkpointer is not None:
        checkpointer.wait()
    record_time(workdir, start, step + 1 if num_steps > start else start, time.perf_counter() - t_start)
    return state


def record_time(workdir: str, first: int, last: int, seconds: float) -> None:
    """Append this session's steps and wall time to ``timing.json`` (a resumed run adds a session)."""
    if jax.process_index() != 0 or last <= first:
        return
    path = os.path.join(workdir, "timing.json")
    sessions = json.load(open(path)) if os.path.isfile(path) else []
    sessions.append({"first_step": first, "last_step": last, "seconds": seconds,
                     "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
                     "kernels": "reference" if layers.reference_kernels() else "fast"})
    with open(path, "w") as f:
        json.dump(sessions, f, indent=1)


def training_seconds(workdir: str) -> float | None:
    """Total wall time of all sessions recorded in ``workdir`` (None if none)."""
    path = os.path.join(workdir, "timing.json")
    return sum(s["seconds"] for s in json.load(open(path))) if os.path.isfile(path) else None


def save_samples(workdir: str, step: int, images) -> str | None:
    if jax.process_index() != 0:
        return None
    return images_lib.save_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), np.asarray(images))
