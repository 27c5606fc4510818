"""The orchestrator: one JAX worker and one PyTorch worker per model, warm, timed in alternation.

For each model the PyTorch worker draws the weights and saves them, the JAX worker converts
those tensors; every implementation runs every task once to warm up (compiling), then
``rounds`` rounds time one call of each (implementation, task), the implementation order
reversed every other round, so that a slow spell of a shared machine lands on all of them
alike. A call's time is the median over rounds. The table is printed and the JSON written
after each model, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from jdistill.bench import report
from jdistill.bench.specs import ModelSpec
from jdistill.bench.worker import MARK

JAX_IMPL = ("jax", "jdistill")


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker process; ``call`` waits for its reply at most ``timeout`` seconds."""

    def __init__(self, side: str, env: dict | None = None):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, "-m", "jdistill.bench.worker", side], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
        self.replies.put(None)  # the process ended

    def call(self, op: str, timeout: float, **args) -> Any:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.side} worker is gone (exit {self.proc.returncode})")
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self.replies.get(timeout=max(timeout, 1.0))
        except queue.Empty:
            self.close()
            raise WorkerError(f"{self.side} worker: {op} timed out after {timeout:.0f} s") from None
        if reply is None:
            raise WorkerError(f"{self.side} worker died during {op} (exit {self.proc.wait()})")
        if not reply["ok"]:
            raise WorkerError(f"{self.side} {op}: {reply['error']}")
        return reply["result"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclasses.dataclass
class Options:
    tasks: tuple[str, ...]
    torch_impls: tuple[str, ...]  # "eager", "compile"
    dtype: str
    rounds: int
    model_timeout: float
    single_thread: bool = False
    seed: int = 0

    def worker_env(self, side: str) -> dict:
        env = {}
        if side == "jax":
            # the JAX worker shares the accelerator with PyTorch: no up-front grab of 75% of it
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            if self.single_thread:
                env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        elif self.single_thread:
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env


def bench_model(spec: ModelSpec, opts: Options, log=print) -> dict:
    """Everything measured for one model: the workers' build reports and one row per
    (implementation, task) with its call times or the error that stopped it."""
    deadline = time.monotonic() + opts.model_timeout
    left = lambda: deadline - time.monotonic()  # noqa: E731
    result: dict = dict(model=spec.name, spec=dataclasses.asdict(spec), dtype=opts.dtype, build={}, rows=[])
    workers: dict[str, Worker] = {}
    rows: dict[tuple, dict] = {}
    impls = ([JAX_IMPL] + [("torch", i) for i in opts.torch_impls])
    for side, impl in impls:
        for task in opts.tasks:
            rows[(side, impl, task)] = dict(impl=impl, task=task, times=[], error=None)
    result["rows"] = list(rows.values())

    def fail(side, message, impl=None):
        for (s, i, _), row in rows.items():
            if s == side and (impl is None or i == impl) and row["error"] is None:
                row["error"] = message

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        try:
            # the PyTorch worker draws the weights, so it starts first even when only JAX is timed
            torch_w = workers["torch"] = Worker("torch", opts.worker_env("torch"))
            result["build"]["torch"] = torch_w.call("build", left(), spec=dataclasses.asdict(spec), weights=weights,
                                                    dtype=opts.dtype, seed=opts.seed)
            jax_w = workers["jax"] = Worker("jax", opts.worker_env("jax"))
            log(f"[{spec.name}] compiling the jdistill train step")
            result["build"]["jax"] = jax_w.call("build", left(), spec=dataclasses.asdict(spec), weights=weights,
                                                dtype=opts.dtype, seed=opts.seed)
        except WorkerError as e:
            fail("jax", str(e))
            fail("torch", str(e))
            _close(workers)
            return result

        live = []
        for side, impl in impls:
            for task in opts.tasks:
                row = rows[(side, impl, task)]
                if row["error"]:
                    continue
                log(f"[{spec.name}] warm-up {impl} {task}")
                try:
                    args = dict(task=task) if side == "jax" else dict(impl=impl, task=task)
                    row.update(workers[side].call("prepare", left(), **args))
                    live.append((side, impl, task))
                except WorkerError as e:
                    row["error"] = str(e)
                    if "timed out" in str(e) or "gone" in str(e) or "died" in str(e):
                        fail(side, str(e))

        for r in range(opts.rounds):
            order = live if r % 2 == 0 else live[::-1]
            for side, impl, task in order:
                row = rows[(side, impl, task)]
                if row["error"]:
                    continue
                try:
                    args = dict(task=task, n=1) if side == "jax" else dict(impl=impl, task=task, n=1)
                    row["times"] += workers[side].call("time", left(), **args)
                except WorkerError as e:
                    row["error"] = str(e)
                    if "timed out" in str(e):
                        fail(side, str(e))
        _close(workers)
    return result


def _close(workers):
    for w in workers.values():
        w.close()


def run(specs: list[ModelSpec], opts: Options, json_path: str | None, log=print) -> list[dict]:
    results = []
    for spec in specs:
        load = os.getloadavg()[0]
        results.append(bench_model(spec, opts, log))
        # a shared machine's other jobs show here: above the core count, timings stretch
        results[-1]["load_average"] = [load, os.getloadavg()[0]]
        results[-1]["cpu_count"] = os.cpu_count()
        log(report.markdown(results))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(dict(options=dataclasses.asdict(opts), results=results, summary=report.summarise(results)),
                          f, indent=1)
    return results
