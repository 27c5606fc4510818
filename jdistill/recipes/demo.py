"""The demo's machinery: where its runs live, how a part is run, timed and its claims printed.
The parts themselves, one per method, are in ``recipes/parts.py``.

`make demo` / `jdistill demo [PART ...]` runs on real handwritten digits. Each part trains (or reuses) what it needs, prints its table and checks its paper's
claims on the numbers; ``make demo`` runs every registered part in order. By default the
teachers are the networks shipped in ``jdistill/assets`` (trained by the shipped configs;
installed as finished runs) and the distillations run on a demo budget that still meets
the claims; ``--full`` trains everything from the configs and reproduces the README's
tables; ``--quick`` checks the plumbing in minutes (its numbers mean nothing).

Tables and grids go to ``runs/demo/<part>/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from jdistill import config as config_lib
from jdistill.errors import InvalidArgument
from jdistill.recipes import assets
from jdistill.recipes import teacher as teacher_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a short run that checks the whole pipeline, not the numbers
QUICK = {
    "digits_teacher": ["--config.train.steps=60", "--config.train.ckpt_every=30"],
    "digits_teacher_small": ["--config.train.steps=60", "--config.train.ckpt_every=30"],
}


def config_path(name: str) -> str:
    """A shipped config: ./configs/NAME.py, else the repository's configs folder."""
    for root in (os.getcwd(), REPO):
        path = os.path.join(root, "configs", f"{name}.py")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no configs/{name}.py under {os.getcwd()} or {REPO}")


@dataclasses.dataclass
class Demo:
    """Where the demo's runs live and how hard it works."""

    workdir: str = "runs"
    num: int = 1000
    quick: bool = False
    full: bool = False

    @property
    def suffix(self) -> str:
        return "_quick" if self.quick else ""

    def run_dir(self, name: str) -> str:
        return os.path.join(self.workdir, name + self.suffix)

    def out(self, part: str) -> str:
        path = os.path.join(self.workdir, "demo" + self.suffix, part)
        os.makedirs(path, exist_ok=True)
        return path

    def teacher(self, name: str) -> str:
        """A digits teacher's workdir: the shipped network installed as a finished run, or (``--full``,
        ``--quick``, or no shipped network) trained from ``configs/<name>.py``."""
        workdir = self.run_dir(name)
        if not (self.full or self.quick) and assets.available(name):
            assets.install(name, workdir)
            print(f"{name}: the shipped network (jdistill/assets/{name}.msgpack) as a finished run in {workdir}")
            return workdir
        return teacher_lib.ensure_trained(config_path(name), workdir, QUICK.get(name, []) if self.quick else [])

    def config(self, name: str, overrides=()):
        return config_lib.load_config(config_path(name), list(overrides))


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str
    run: Callable[[Demo], dict]  # prints its table and claims; returns what goes into summary.json


def claim(text: str, value: float, target: str, ok: bool) -> dict:
    print(f"  [{'met' if ok else 'NOT MET'}] {text}: {value:.3f} (target {target})", flush=True)
    return {"claim": text, "value": float(value), "target": target, "ok": bool(ok)}


def run(registry: dict[str, Part], names=None, *, workdir: str = "runs", num: int = 1000, quick: bool = False,
        full: bool = False) -> dict:
    """Run the named parts of ``registry`` (all, in order, by default); print and save the summary."""
    names = list(names or registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise InvalidArgument(f"unknown demo part(s) {unknown}; parts: {list(registry)}")
    if quick and full:
        raise InvalidArgument("--quick and --full exclude each other")
    demo = Demo(workdir, num, quick, full)
    summary, times = {}, {}
    for name in names:
        p = registry[name]
        print(f"\n== {p.name}: {p.title} ==", flush=True)
        start = time.perf_counter()
        summary[name] = p.run(demo)
        times[name] = time.perf_counter() - start
        print(f"({p.name}: {times[name] / 60:.1f} min)", flush=True)
    out = os.path.join(workdir, "demo" + demo.suffix)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"parts": summary, "minutes": {k: v / 60 for k, v in times.items()}}, f, indent=1)
    print("\n" + "\n".join(f"{k:12s} {v / 60:5.1f} min" for k, v in times.items())
          + f"\n{'total':12s} {sum(times.values()) / 60:5.1f} min", flush=True)
    failed = [c["claim"] for s in summary.values() for c in s.get("claims", []) if not c["ok"]]
    print(f"tables, grids and plots in {out}; " + (f"claims NOT met: {failed}" if failed else "every claim met"))
    return summary


__all__ = ["Demo", "Part", "claim", "config_path", "run"]
