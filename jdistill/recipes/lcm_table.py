"""The LCM results table on digits, in the guided-distillation table's format: the teacher with DDIM +
CFG against the consistency student with LCMScheduler's sampler (and CoDi's deterministic one),
FD / class accuracy / wall time, with the LCM target checked on the numbers.

    jdistill lcm-table --workdir runs/digits_lcm --guidance 1.5 --out runs/lcm_table
"""

from __future__ import annotations

from jdistill.errors import InvalidArgument
from jdistill.recipes import consistency, evaluation, guided_table, runs
from jdistill.recipes import teacher as teacher_lib

TEACHER_STEPS = (1, 2, 4, 8, 16, 64)
STUDENT_STEPS = (1, 2, 4, 8)
GRID_STEPS = (1, 4, 64)


def results_table(workdir: str, *, guidance_scales=(1.5,), num: int = 1000, out_dir: str | None = None,
                  teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, seed: int = 0, progress: bool = True) -> dict:
    """FD, class accuracy and wall time per 1000 samples of the teacher (DDIM + CFG) and the student
    (``lcm`` at every step count, ``codi`` at 4), per guidance scale."""
    run = runs.open_run(workdir)
    if run.recipe != "lcm":
        raise InvalidArgument(f"{workdir} is a {run.recipe!r} run; lcm-table reads an LCM distillation's workdir")
    teacher_dir = run.stage_config(consistency.STAGE).teacher.workdir
    teacher_run = runs.open_run(teacher_dir)
    rows, timed, grids = [], [], {}

    def add(kind, steps, g, sampler, mode):
        row, images = evaluation.score(sampler, num, seed, repeats=1)
        row.update(model=kind, steps=steps, guidance_scale=g, w=g - 1.0, mode=mode)
        rows.append(row)
        timed.append((row, sampler))
        if progress:
            print(f"{kind:8s} {mode:8s} {steps:3d} steps g={g:g}: FD {row['fd']:.2f} acc {row['class_acc']:.3f} "
                  f"{row['s_per_1000']:.3f} s/1000", flush=True)
        if steps in GRID_STEPS:
            grids[f"{kind}_{mode}_{steps}steps_g{g:g}"] = images

    for g in guidance_scales:
        for n in teacher_steps:
            add("teacher", n, g, teacher_lib.make_sampler(teacher_run, steps=n, solver="ddim", guidance_scale=g),
                "ddim+cfg")
        for n in student_steps:
            add("student", n, g, consistency.make_sampler(run, steps=n, solver="lcm", guidance_scale=g), "lcm")
        add("student", 4, g, consistency.make_sampler(run, steps=4, solver="codi", guidance_scale=g), "codi")
    evaluation.retime_round_robin(timed, num, repeats=evaluation.TIMING_REPEATS, seed=seed)
    result = {"teacher": teacher_dir, "student": workdir, "num": num, "rows": rows,
              "device": evaluation.device_name(), "checks": claims(rows)}
    if out_dir:
        evaluation.write_report(out_dir, result, format_results(result), grids)
    return result


def _get(rows, model, steps, g, mode):
    return next((r for r in rows if r["model"] == model and r["steps"] == steps and r["guidance_scale"] == g
                 and r["mode"] == mode), None)


def claims(rows) -> list[dict]:
    out = []
    for g in sorted({r["guidance_scale"] for r in rows}):
        t64, s4 = _get(rows, "teacher", 64, g, "ddim+cfg"), _get(rows, "student", 4, g, "lcm")
        if t64 is None or s4 is None:
            continue
        out += [
            {"g": g, "claim": "4-step LCM student FD at most 1.3x the teacher's 64-step CFG FD",
             "value": s4["fd"] / t64["fd"], "target": "<= 1.3", "ok": s4["fd"] <= 1.3 * t64["fd"]},
            {"g": g, "claim": "4-step LCM student at least 10x faster than the teacher's 64-step CFG sampling",
             "value": t64["s_per_1000"] / s4["s_per_1000"], "target": ">= 10",
             "ok": t64["s_per_1000"] >= 10 * s4["s_per_1000"]},
        ]
    return out


def format_results(result: dict) -> str:
    return guided_table.format_results(result, "Latent consistency distillation (LCM)")
