"""The collaboration's results: every strategy at budgets of average network evaluations, a sweep
over k and sigma, a table, a plot of FD against evaluations, the paper's claims checked, and the
best setting within a budget.

    jdistill collab-sweep --student runs/digits_guided_small/steps_001 --student-steps 1 \
        --teacher runs/digits_teacher --budgets 6 8 10 12 --out runs/collab
    jdistill collab-pick runs/collab/results.json --budget 10

At a budget B (average evaluations per sample; a CFG step is two, c below: 2 with CFG, 1 for a
teacher without it, such as a CoDi run's conditional model), each strategy spends at most what the
student leaves: the teacher alone takes floor(B / c) steps of the sweep's solver (``--solver``, DDIM
by default: every teacher run of the sweep uses it); refine-everything refines all samples with
floor((B - s) / c) steps; adaptive refinement and regeneration improve the k% the oracle scores
lowest with floor((B - s) / (c k / 100)) steps (s: the student's evaluations). A budget is a cap, as
in ``pick``: a strategy rounded up would spend more than the strategies it is compared with (Python's
``round`` gave refine-everything 9 evaluations at B = 8 and 13 at B = 12). The evaluations reported
are the ones the run spent (its selections), not the target; the table and the claims take, at each
budget, each strategy's best row whose spent evaluations fit it.
"""

from __future__ import annotations

import os

import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.metrics import oracles
from jdistill.recipes import collab, collab_report, evaluation
from jdistill.recipes import stitch as stitch_lib
from jdistill.recipes.collab_report import best
from jdistill.sampling.collaborate import Refinement, nominal_steps, teacher_calls
from jdistill.sampling.stitch import network_calls


def refinement(form: str, sigma: float, run_steps: int, solver: str) -> Refinement:
    """A refinement that runs ``run_steps`` teacher steps (img2img: the released code's nominal count)."""
    if form == "img2img":
        return Refinement(form, sigma, nominal_steps(run_steps, sigma), solver)
    return Refinement(form, sigma, run_steps, solver)


def teacher_steps(budget: float, spent: float, share: float, per_step: int, solver: str = "ddim") -> int:
    """The most teacher steps whose evaluations (``per_step`` a network call, 2 with CFG, on ``share``
    of the samples) fit what the student's ``spent`` leaves of ``budget``; at least one (share 0: one,
    run on no sample)."""
    if share <= 0:
        return 1
    # the epsilon keeps an exact fit (e.g. (10 - 1) / (2 x 0.9) = 5) from falling one step short
    fits = lambda n: network_calls(solver, n) * per_step * share <= budget - spent + 1e-9  # noqa: E731
    steps = 1
    while fits(steps + 1):
        steps += 1
    return steps


def sweep(student_dir: str, teacher_dirs, *, student_steps: int = 1, guidance_scale: float = 1.5,
          teacher_fractions=None, oracle: str = "digits_confidence", budgets=(6, 8, 10, 12), ks=(30, 50, 70),
          sigmas=(0.4, 0.6, 0.8), form: str = "paper", solver: str = "ddim", reference_steps: int = 64,
          num: int = 1000, calibration: str | None = None, calibration_num: int | None = None, out_dir: str,
          seed: int = 0, buckets: int = 8, repeats: int = evaluation.TIMING_REPEATS, progress: bool = True) -> dict:
    """All strategies at every budget, FD / class accuracy / wall time; table, plot and claims."""
    student = collab.load_student(student_dir, steps=student_steps, guidance_scale=guidance_scale)
    teacher, members = collab.load_teacher(teacher_dirs, guidance_scale=guidance_scale, fractions=teacher_fractions)
    collab.check_pair(student, members)
    scorer = oracles.get(oracle)
    calib = _calibration(student, scorer, calibration, calibration_num, out_dir, seed)
    per_step = max(teacher.passes)
    rows, timed, grids = [], [], {}

    def add(strategy, sampler, budget=None, **fields):
        images, labels, seconds = sampler.run(num, seed=seed)
        spent = sampler.plan.budget() if isinstance(sampler.plan, collab.CollabPlan) else fields.pop("spent")
        row = {"strategy": strategy, "budget": budget, **fields, **spent, **sampler.evaluate(images, labels),
               "s_per_1000": seconds * 1000.0 / num, "sampler": sampler.description}
        rows.append(row)
        timed.append((row, sampler))
        if progress:
            print(f"{strategy:15s} budget {budget or '-':>4} {sampler.description:45s} evals {row['avg_evals']:5.2f} "
                  f"FD {row['fd']:6.2f} acc {row['class_acc']:.3f} {row['s_per_1000']:7.2f} s/1000", flush=True)
        if fields.get("k") in (None, min(ks, key=lambda k: abs(k - 50))):
            grids[f"{strategy}_{budget or 'alone'}"] = images
        return row

    def collab_row(strategy, budget, k, sigma, steps):
        r = (refinement(form, sigma, steps, solver) if strategy != "adaptive_regen"
             else Refinement("regenerate", 1.0, steps, solver))
        sampler = collab.collab_sampler(student, scorer, teacher, members, r, calib.tau(k), buckets=buckets,
                                        description=f"k={k:g} {r.describe()}")
        return add(strategy, sampler, budget, k=k, sigma=None if strategy == "adaptive_regen" else sigma,
                   teacher_steps=steps)

    def teacher_row(steps, budget):
        sampler = stitch_lib.stitched_sampler(members, teacher.fractions, steps=steps,
                                              solver=solver).with_conditions_of(student.sampler)
        guided = f", CFG g={guidance_scale:g}" if per_step > 1 else ""
        sampler.description = f"teacher {solver} {steps} steps{guided}" + (
            f" (stitched {'/'.join(f'{f:g}' for f in teacher.fractions)})" if len(members) > 1 else "")
        calls = teacher_calls(sampler.plan, teacher.passes)
        return add("teacher", sampler, budget, teacher_steps=steps,
                   spent={"refined_share": 1.0, "avg_steps": steps, "avg_evals": calls, "padded_evals": calls})

    add("student", student.sampler, spent={"refined_share": 0.0, "avg_steps": student.steps,
                                           "avg_evals": student.evaluations, "padded_evals": student.evaluations})
    reference = teacher_row(reference_steps, None)
    for budget in budgets:
        if budget <= student.evaluations:
            raise InvalidArgument(f"budget {budget} leaves nothing for the teacher after the student's "
                                  f"{student.evaluations} evaluations")
        teacher_row(teacher_steps(budget, 0, 1.0, per_step, solver), budget)
        for sigma in sigmas:
            collab_row("refine_all", budget, 100, sigma, teacher_steps(budget, student.evaluations, 1.0, per_step, solver))
        for k in ks:
            steps = teacher_steps(budget, student.evaluations, k / 100, per_step, solver)
            for sigma in sigmas:
                collab_row("adaptive_refine", budget, k, sigma, steps)
            collab_row("adaptive_regen", budget, k, None, steps)
    pair = timing_pair(rows, budgets)
    if pair is not None:  # refine-everything with the same teacher run as the ~10-evaluation adaptive pick
        pair["refine_all_same"] = collab_row("refine_all", None, 100, pair["adaptive"]["sigma"],
                                             pair["adaptive"]["teacher_steps"])
    evaluation.retime_round_robin(timed, num, repeats=repeats, seed=seed)
    result = {"student": student.settings, "teacher": [os.path.abspath(w) for w in np.atleast_1d(teacher_dirs)],
              "teacher_fractions": list(teacher.fractions), "oracle": scorer.provenance, "form": form,
              "solver": solver, "teacher_cfg": per_step > 1, "condition_kind": student.condition_kind, "num": num, "budgets": list(budgets), "reference_steps": reference_steps,
              "calibration": calib.settings, "device": evaluation.device_name(), "rows": rows}
    result["checks"] = claims(result, reference, pair)
    evaluation.write_report(out_dir, result, collab_report.format_results(result), grids)
    collab_report.plot(result, os.path.join(out_dir, "sweep.png"))
    return result


def _calibration(student, scorer, path, num, out_dir, seed) -> collab.Calibration:
    """tau's calibration: the file at ``path`` (checked against the student, the oracle and ``num``
    when given), else ``num`` (default 1000) samples drawn at ``collab.CALIBRATION_SEED``; either way
    never the evaluation's own ``seed``, whose samples tau would then be fitted on."""
    if path:
        calib = collab.Calibration.load(path)
        made_at = calib.settings.get("seed")
        calib.check(collab.calibration_settings(student, scorer, len(calib.scores) if num is None else num, made_at))
    else:
        made_at = collab.CALIBRATION_SEED
    if made_at == seed:
        raise collab.CalibrationMismatch(f"the calibration is drawn at seed {made_at}, the evaluation's own: tau "
                                         "would be fitted on the samples it selects; evaluate at another --seed "
                                         "(or calibrate at another with `jdistill collab-calibrate --seed`)")
    if path:
        return calib
    calib = collab.calibrate(student, scorer, num=num or 1000)
    calib.save(os.path.join(out_dir, "calibration.json"))
    return calib


def timing_pair(rows, budgets) -> dict | None:
    """The adaptive refinement at the k nearest 50 and the budget nearest 10 evaluations (its best sigma):
    whose time is compared with refining everything with the same teacher run."""
    near = min(budgets, key=lambda b: abs(b - 10))
    fits = [r for r in rows if r["strategy"] == "adaptive_refine" and r["budget"] == near]
    k = min((r["k"] for r in fits), key=lambda k: abs(k - 50), default=None)
    fits = [r for r in fits if r["k"] == k]
    return {"adaptive": min(fits, key=lambda r: r["fd"])} if fits else None


def claims(result, reference, pair) -> list[dict]:
    rows, out = result["rows"], []
    student = next(r for r in rows if r["strategy"] == "student")
    out.append({"claim": "the student's FD is at least 15% worse than the teacher's best",
                "value": student["fd"] / reference["fd"], "target": ">= 1.15", "ok": student["fd"] >= 1.15 * reference["fd"]})
    for b in result["budgets"]:
        ad, ra, te = (best(rows, s, b) for s in ("adaptive_refine", "refine_all", "teacher"))
        out += [{"claim": f"~{b} evaluations: adaptive refinement FD below refine-everything's", "budget": b,
                 **_below(ad, ra)},
                {"claim": f"~{b} evaluations: adaptive refinement FD below the teacher alone's", "budget": b,
                 **_below(ad, te)}]
    near = min(result["budgets"], key=lambda b: abs(b - 10))
    ad = best(rows, "adaptive_refine", near)
    ratio = ad["fd"] / reference["fd"] if ad else float("nan")  # nan: no adaptive row fits the budget
    out.append({"claim": f"~{near} evaluations: adaptive refinement FD over the teacher's {reference['teacher_steps']}"
                         "-step FD", "budget": near, "value": ratio, "target": "<= 1.05", "ok": ratio <= 1.05})
    if pair is not None:
        a, full = pair["adaptive"], pair["refine_all_same"]
        share = (a["s_per_1000"] - student["s_per_1000"]) / max(full["s_per_1000"] - student["s_per_1000"], 1e-9)
        out.append({"claim": f"wall time follows evaluations: teacher time of k={a['k']} ({a['refined_share']:.2f} refined) "
                             "over refining everything with the same run", "value": share,
                    "target": f"within 0.15 of {a['refined_share']:.2f}",
                    "ok": abs(share - a["refined_share"]) <= 0.15})
    return out


def _below(row, other) -> dict:
    """FD of ``row`` minus ``other``'s (nan, not met, when either strategy has no row within the budget)."""
    if row is None or other is None:
        return {"value": float("nan"), "target": "< 0", "ok": False}
    return {"value": row["fd"] - other["fd"], "target": "< 0", "ok": row["fd"] < other["fd"]}


def pick(result: dict, budget: float) -> dict:
    """The lowest-FD row (any strategy and setting) whose measured average evaluations fit ``budget``."""
    fits = [r for r in result["rows"] if collab_report.fits(r, budget)]
    if not fits:
        cheapest = min(result["rows"], key=lambda r: r["avg_evals"])
        raise InvalidArgument(f"nothing fits {budget:g} evaluations; the cheapest row is {cheapest['sampler']} at "
                              f"{cheapest['avg_evals']:.2f}")
    return min(fits, key=lambda r: (r["fd"], r["avg_evals"]))
