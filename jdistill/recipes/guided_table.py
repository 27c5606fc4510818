"""The guided-distillation results table: the teacher with DDIM + CFG against the distilled students,
FD / class accuracy / wall time, with Meng et al.'s claims checked on the numbers.

    jdistill guided-table --workdir runs/digits_guided --guidance 1.5 2.0 --out runs/guided_table
"""

from __future__ import annotations

import re

from jdistill.errors import InvalidArgument, check_finite, check_positive_int
from jdistill.files import check_output_dir
from jdistill.recipes import evaluation, guided, runs
from jdistill.recipes import teacher as teacher_lib

TEACHER_STEPS = (1, 2, 4, 8, 16, 64)
STUDENT_STEPS = (1, 2, 4, 8)
GRID_STEPS = (1, 4, 64)


class TableRows:
    """The rows of a teacher-vs-student table: each sampler scored once and kept for the round-robin
    retiming, the sample grids of ``GRID_STEPS`` kept for the report (the LCM table shares it)."""

    def __init__(self, num: int, seed: int, progress: bool):
        self.num, self.seed, self.progress = num, seed, progress
        self.rows, self.timed, self.grids = [], [], {}

    def add(self, kind, steps, g, sampler, mode):
        row, images = evaluation.score(sampler, self.num, self.seed, repeats=1)
        row.update(model=kind, steps=steps, guidance_scale=g, w=g - 1.0, mode=mode)
        self.rows.append(row)
        self.timed.append((row, sampler))
        if self.progress:
            print(f"{kind:8s} {mode:10s} {steps:3d} steps g={g:g}: FD {row['fd']:.2f} acc {row['class_acc']:.3f} "
                  f"{row['s_per_1000']:.3f} s/1000", flush=True)
        if steps in GRID_STEPS:
            self.grids[f"{re.sub(r'[^0-9A-Za-z]+', '_', kind).strip('_')}_{mode}_{steps}steps_g{g:g}"] = images

    def add_teacher(self, teacher_run, steps, g):
        self.add("teacher", steps, g, teacher_lib.make_sampler(teacher_run, steps=steps, solver="ddim",
                                                               guidance_scale=g), "ddim+cfg")

    def report(self, out_dir, result: dict, claims_fn, format_fn) -> dict:
        """Retime every row, check the claims, write the report to ``out_dir`` (if given)."""
        evaluation.retime_round_robin(self.timed, self.num, repeats=evaluation.TIMING_REPEATS, seed=self.seed)
        result = dict(result, num=self.num, rows=self.rows, device=evaluation.device_name(),
                      checks=claims_fn(self.rows))
        if out_dir:
            evaluation.write_report(out_dir, result, format_fn(result), self.grids)
        return result


def results_table(workdir: str, *, guidance_scales=(1.5, 2.0), num: int = 1000, out_dir: str | None = None,
                  teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, seed: int = 0, stochastic: bool = True,
                  progress: bool = True) -> dict:
    """FD, class accuracy and wall time per 1000 samples for the teacher at ``teacher_steps`` and the
    students at ``student_steps`` (DDIM and, with ``stochastic``, the stochastic sampler), per scale."""
    guidance_scales = [check_finite("--guidance", g) for g in guidance_scales]
    if not guidance_scales:
        raise InvalidArgument("--guidance: give at least one guidance scale")
    check_positive_int("--num", num)
    if out_dir:
        check_output_dir(out_dir)
    run = runs.open_run(workdir)
    if run.recipe != "guided":
        raise InvalidArgument(f"{workdir} is a {run.recipe!r} run; guided-table reads a guided distillation's workdir")
    teacher_dir = run.stage_config("stage1").teacher.workdir
    teacher_run = runs.open_run(teacher_dir)
    table = TableRows(num, seed, progress)
    for g in guidance_scales:
        for n in teacher_steps:
            table.add_teacher(teacher_run, n, g)
        for n in student_steps:
            # a step count without its distilled round samples the stage-1 student: named as such, so
            # the claims (which read the distilled rounds) never judge it as the N-step student
            kind = "student" if guided.pick_stage(run, n) == f"steps_{n:03d}" else "student (stage1)"
            for stoch in ((False, True) if stochastic else (False,)):
                if stoch and n == 1:
                    continue  # one step has only the (deterministic) last step
                table.add(kind, n, g, guided.make_sampler(run, steps=n, guidance_scale=g, stochastic=stoch),
                          "stochastic" if stoch else "ddim")
    return table.report(out_dir, {"teacher": teacher_dir, "student": workdir}, claims, format_results)


def _get(rows, model, steps, g, mode):
    return next((r for r in rows if r["model"] == model and r["steps"] == steps and r["guidance_scale"] == g
                 and r["mode"] == mode), None)


def claims(rows) -> list[dict]:
    """The paper's claims at this scale, each with the numbers it was judged on (a claim on a distilled
    round the run does not have: not met, value nan)."""
    out = []
    for g in sorted({r["guidance_scale"] for r in rows}):
        t64, t8, t4 = (_get(rows, "teacher", n, g, "ddim+cfg") for n in (64, 8, 4))
        s4, s1 = _get(rows, "student", 4, g, "ddim"), _get(rows, "student", 1, g, "ddim")
        four = [] if s4 is None else [
            {"g": g, "claim": "4-step student FD within 15% of the teacher's 64-step FD",
             "value": s4["fd"] / t64["fd"], "target": "<= 1.15", "ok": s4["fd"] <= 1.15 * t64["fd"]},
            {"g": g, "claim": "4-step student FD below the teacher's 8-step DDIM FD",
             "value": s4["fd"] - t8["fd"], "target": "< 0", "ok": s4["fd"] < t8["fd"]}]
        one = [] if s1 is None else [
            {"g": g, "claim": "1-step student FD below the teacher's 4-step DDIM FD",
             "value": s1["fd"] - t4["fd"], "target": "< 0", "ok": s1["fd"] < t4["fd"]}]
        speed = [] if s4 is None else [
            {"g": g, "claim": "4-step student at least 25x faster than the teacher's 64-step CFG sampling",
             "value": t64["s_per_1000"] / s4["s_per_1000"], "target": ">= 25",
             "ok": t64["s_per_1000"] >= 25 * s4["s_per_1000"]}]
        missing = [{"g": g, "claim": f"the {n}-step student's claims: no row of a distilled {n}-step round "
                                     f"(steps_{n:03d})",
                    "value": float("nan"), "target": "a distilled round", "ok": False}
                   for n, r in ((4, s4), (1, s1)) if r is None]
        out += four + one + speed + missing
    return out


def format_results(result: dict, method: str = "Guided distillation") -> str:
    title = (f"{method} on digits: {result['num']} samples per row, FD against the held-out split "
             f"({result['device']}; wall time: the best of 3 runs taken round-robin over all rows, "
             "compilation excluded)")
    lines = [title, "",
             "| model | sampler | steps | g (w = g - 1) | FD | class acc | s / 1000 samples |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['steps']} | {r['guidance_scale']:g} ({r['w']:g}) | "
                     f"{r['fd']:.2f} | {r['class_acc']:.3f} | {r['s_per_1000']:.3f} |")
    lines += ["", evaluation.claims_table(result["checks"], key="g")]
    return "\n".join(lines)

