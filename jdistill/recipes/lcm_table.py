"""The LCM results table on digits, in the guided-distillation table's format: the teacher with DDIM +
CFG against the consistency student with LCMScheduler's sampler (and CoDi's deterministic one),
FD / class accuracy / wall time, with the LCM target checked on the numbers.

    jdistill lcm-table --workdir runs/digits_lcm --guidance 1.5 --out runs/lcm_table
"""

from __future__ import annotations

from jdistill.errors import InvalidArgument
from jdistill.recipes import consistency, guided_table, runs

TEACHER_STEPS = guided_table.TEACHER_STEPS
STUDENT_STEPS = (1, 2, 4, 8)


def results_table(workdir: str, *, guidance_scales=(1.5,), num: int = 1000, out_dir: str | None = None,
                  teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, seed: int = 0, progress: bool = True) -> dict:
    """FD, class accuracy and wall time per 1000 samples of the teacher (DDIM + CFG) and the student
    (``lcm`` at every step count, ``codi`` at 4), per guidance scale."""
    run = runs.open_run(workdir)
    if run.recipe != "lcm":
        raise InvalidArgument(f"{workdir} is a {run.recipe!r} run; lcm-table reads an LCM distillation's workdir")
    teacher_dir = run.stage_config(consistency.STAGE).teacher.workdir
    teacher_run = runs.open_run(teacher_dir)
    table = guided_table.TableRows(num, seed, progress)
    for g in guidance_scales:
        for n in teacher_steps:
            table.add_teacher(teacher_run, n, g)
        for n in student_steps:
            table.add("student", n, g, consistency.make_sampler(run, steps=n, solver="lcm", guidance_scale=g), "lcm")
        table.add("student", 4, g, consistency.make_sampler(run, steps=4, solver="codi", guidance_scale=g), "codi")
    return table.report(out_dir, {"teacher": teacher_dir, "student": workdir}, claims, format_results)


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
