"""The LADD results table: one flow teacher, every method distilled from it, one table.

    jdistill ladd-table --workdir runs/digits_ladd_seed0 runs/digits_ladd_seed1 runs/digits_ladd_seed2 \\
        --compare progressive=runs/digits_flow_guided consistency=runs/digits_flow_lcm --out runs/ladd_table

Rows: the teacher with Euler + CFG at 1, 2, 4, 8, 16, 64 steps; each LADD run (one per training
seed) unguided at 1, 2, 4 steps; each ``--compare`` run (a student of another recipe distilled from
the SAME teacher: configs/digits_flow_guided.py, configs/digits_flow_lcm.py) at 1, 2, 4 steps
through its recipe's own sampler, reading the teacher's CFG scale
as its guidance input where it takes one. FD and class accuracy against the held-out digits, wall
time per 1000 samples (best of 3, round-robin). The paper's claims are checked on the numbers:
the 4-step student's FD at most 1.10x the teacher's 64-step CFG FD, the 1-step's at most 1.5x
(both on the mean over seeds), 4-step sampling at least 25x faster than 64-step CFG, and no seed
collapsed (every seed's FD within 1.2x of the best seed's, at every step count).
"""

from __future__ import annotations

import os

import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.recipes import evaluation, get_recipe, runs
from jdistill.recipes import teacher as teacher_lib

TEACHER_STEPS = (1, 2, 4, 8, 16, 64)
STUDENT_STEPS = (1, 2, 4)
GRID_STEPS = (1, 4, 64)


def teacher_of(run: runs.Run) -> str:
    """The teacher workdir a distillation run was made from (any recipe whose config names one)."""
    cfg = run.stage_config(run.stages[0]) if run.stage is None else run.config
    workdir = (cfg.get("teacher") or {}).get("workdir")
    if not workdir:
        raise InvalidArgument(f"{run.workdir}: its config names no teacher workdir")
    return os.path.abspath(workdir)


def results_table(workdirs, *, compare: dict | None = None, num: int = 1000, out_dir: str | None = None,
                  teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, guidance_scale: float | None = None,
                  seed: int = 0, progress: bool = True) -> dict:
    """Score the teacher, the LADD runs (``workdirs``: one per training seed) and the ``compare``
    runs ({name: workdir}); returns (and with ``out_dir`` writes) the rows, seed spread and checks."""
    ladd_runs = [runs.open_run(w) for w in workdirs]
    for r in ladd_runs:
        if r.recipe != "ladd":
            raise InvalidArgument(f"{r.workdir} is a {r.recipe!r} run; --workdir takes LADD runs (one per seed)")
    teacher_dir = teacher_of(ladd_runs[0])
    others = {name: runs.open_run(w) for name, w in (compare or {}).items()}
    for r in ladd_runs[1:] + list(others.values()):
        if teacher_of(r) != teacher_dir:
            raise InvalidArgument(f"{r.workdir} was distilled from {teacher_of(r)}, not from {teacher_dir}: the "
                                  "table compares students of ONE teacher")
    teacher_run = runs.open_run(teacher_dir)
    # the teacher rows sample at the CFG scale of the data the students learnt (their synth section)
    learnt = sorted({float(r.config.synth.guidance_scale) for r in ladd_runs})
    if len(learnt) > 1 and guidance_scale is None:
        raise InvalidArgument(f"the LADD runs learnt teacher samples at CFG scales {learnt}: one table compares "
                              "students of one synthetic set (or name the teacher's with --guidance)")
    g = float(learnt[0] if guidance_scale is None else guidance_scale)
    rows, timed, grids = [], [], {}

    def add(model, steps, sampler, mode, **extra):
        row, images = evaluation.score(sampler, num, seed, repeats=1)
        row.update(model=model, steps=steps, mode=mode, **extra)
        rows.append(row)
        timed.append((row, sampler))
        if progress:
            print(f"{model:22s} {mode:16s} {steps:3d} steps: FD {row['fd']:.2f} acc {row['class_acc']:.3f} "
                  f"{row['s_per_1000']:.3f} s/1000", flush=True)
        if steps in GRID_STEPS:
            grids[f"{model}_{steps}steps".replace(" ", "_")] = images

    for n in teacher_steps:
        add("teacher", n, teacher_lib.make_sampler(teacher_run, steps=n, solver="euler", guidance_scale=g),
            f"euler+cfg g={g:g}")
    seeds = [int(r.config.seed) for r in ladd_runs]
    for i, r in enumerate(ladd_runs):
        # two runs of one seed (a run and its resumed twin) keep apart in the rows and the pictures
        name = f"ladd seed {seeds[i]}" + (f" run {i}" if seeds.count(seeds[i]) > 1 else "")
        for n in student_steps:
            add(name, n, get_recipe("ladd").sampler(r, steps=n), "renoise, unguided",
                method="ladd", run=i)
    for name, r in others.items():
        for n in student_steps:
            add(name, n, get_recipe(r.recipe).sampler(r, steps=n, guidance_scale=g), f"{r.recipe}, g={g:g}",
                method=name)
    evaluation.retime_round_robin(timed, num, repeats=evaluation.TIMING_REPEATS, seed=seed)
    spread = seed_spread(rows, student_steps)
    result = {"teacher": teacher_dir, "ladd": [r.workdir for r in ladd_runs],
              "compare": {k: r.workdir for k, r in others.items()}, "num": num, "guidance_scale": g, "rows": rows,
              "seeds": spread, "device": evaluation.device_name(), "checks": claims(rows, spread)}
    if out_dir:
        evaluation.write_report(out_dir, result, format_results(result), grids)
    return result


def seed_spread(rows, student_steps) -> list[dict]:
    """Per step count: every LADD seed's FD, their mean and std, and the worst over the best."""
    out = []
    for n in student_steps:
        fds = [r["fd"] for r in rows if r.get("method") == "ladd" and r["steps"] == n]
        out.append({"steps": n, "fd": fds, "mean": float(np.mean(fds)), "std": float(np.std(fds)),
                    "worst_over_best": float(max(fds) / min(fds))})
    return out


def _row(rows, model, steps):
    return next(r for r in rows if r["model"] == model and r["steps"] == steps)


def claims(rows, spread) -> list[dict]:
    t64 = _row(rows, "teacher", 64)
    by_steps = {s["steps"]: s for s in spread}
    ladd4 = [r for r in rows if r.get("method") == "ladd" and r["steps"] == 4]
    out = []
    for n, bound in ((4, 1.10), (1, 1.5)):
        if n in by_steps:
            ratio = by_steps[n]["mean"] / t64["fd"]
            out.append({"claim": f"{n}-step unguided LADD FD (mean over seeds) over the teacher's 64-step CFG FD",
                        "value": ratio, "target": f"<= {bound:.2f}", "ok": ratio <= bound})
    if ladd4:
        speed = t64["s_per_1000"] / min(r["s_per_1000"] for r in ladd4)
        out.append({"claim": "4-step LADD sampling speed-up over the teacher's 64-step CFG", "value": speed,
                    "target": ">= 25", "ok": speed >= 25})
    if spread and len(spread[0]["fd"]) > 1:
        worst = max(s["worst_over_best"] for s in spread)
        out.append({"claim": f"no seed collapses: worst seed's FD over the best's ({len(spread[0]['fd'])} seeds, "
                             "worst step count)", "value": worst, "target": "<= 1.20", "ok": worst <= 1.2})
    return out


def format_results(result: dict) -> str:
    title = (f"One flow teacher, every method: {result['num']} samples per row, FD against the held-out digits "
             f"({result['device']}; wall time: the best of 3 runs taken round-robin over all rows, compilation "
             "excluded)")
    lines = [title, "", "| model | sampler | steps | FD | class acc | s / 1000 samples |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['steps']} | {r['fd']:.2f} | {r['class_acc']:.3f} | "
                     f"{r['s_per_1000']:.3f} |")
    lines += ["", "| LADD steps | FD per seed | mean | std | worst / best |", "|---|---|---|---|---|"]
    for s in result["seeds"]:
        lines.append(f"| {s['steps']} | {', '.join(f'{x:.2f}' for x in s['fd'])} | {s['mean']:.2f} | "
                     f"{s['std']:.2f} | {s['worst_over_best']:.3f} |")
    lines += ["", evaluation.claims_table(result["checks"])]
    return "\n".join(lines)
