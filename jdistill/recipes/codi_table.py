"""The conditional results table: CoDi and PE-CoDi against their baselines, per task, with the
paper's claims checked on the numbers.

    jdistill codi-table --workdir runs/digits_codi_sr2 runs/digits_codi_inpaint runs/photo_codi_sr4 --out runs/codi_table

Rows per task (a ``codi`` workdir): the fine-tuned conditional model with DDIM at 50 and 4 steps,
the two-stage baseline at 4, CoDi and PE-CoDi at 1, 2 and 4 steps. Columns: PSNR and SSIM against
the ground truth, FD (digits: the shipped digits classifier's features against the held-out
split; photographs: ``photo_classifier``'s against the held-out photographs), the share of digits
classified as their source digit, wall time per 1000 samples (the best of 3 runs taken round-robin
over all rows). Writes results.json, results.md and, per task, a PNG whose rows are the condition,
the ground truth and each method's 4-step output (the fine-tuned model's at 50).
"""

from __future__ import annotations

import os

import numpy as np

from jdistill import images as images_lib
from jdistill.data import conditions
from jdistill.diffusion import timesteps
from jdistill.errors import InvalidArgument
from jdistill.recipes import codi, consistency, evaluation, runs

# (stage, solver, steps); solver None: the stage config's consistency sampler (``sample.solver``)
ROWS = (("finetune", "ddim", 50), ("finetune", "ddim", 4), ("two_stage", None, 4),
        ("codi", None, 1), ("codi", None, 2), ("codi", None, 4),
        ("pe_codi", None, 1), ("pe_codi", None, 2), ("pe_codi", None, 4))
PICTURE_ROWS = (("finetune", 50), ("finetune", 4), ("two_stage", 4), ("codi", 4), ("pe_codi", 4))
EXAMPLES = 10


def evaluators_for(dataset: str) -> tuple[str, ...]:
    return ("paired", "digits") if dataset.startswith("digits") else ("paired", "photos")


def condition_picture(spec: conditions.ConditionSpec, conds: np.ndarray, channels: int) -> np.ndarray:
    """What a person sees of a condition: the upsampled low-res image, the masked image, the edges."""
    x = conds[..., :channels] if spec.kind != "edges" else np.repeat(conds[..., :1], channels, axis=-1)
    return images_lib.to_uint8(x)


def task_rows(workdir: str, num: int, seed: int, progress: bool, spacing: str | None = None,
              solver: str | None = None, seeds: int = 1):
    run = runs.open_run(workdir)
    if run.recipe != "codi":
        raise InvalidArgument(f"{workdir} is a {run.recipe!r} run; codi-table reads CoDi workdirs")
    cfg = run.stage_config(run.stages[0])
    spec = conditions.parse(cfg.condition.kind)
    task = f"{cfg.data.name} {spec.name}"
    rows, timed, outputs, first = [], [], {}, None
    for stage, row_solver, steps in ROWS:
        if stage not in run.stages:
            continue
        # the consistency rows sample as ``solver`` / ``spacing`` say, else as the stage's config does
        stage_cfg = run.stage_config(stage)
        solver_used = row_solver or solver or stage_cfg.sample.solver
        used = consistency.spacing_of(stage_cfg, solver_used, None if row_solver else spacing)
        sampler = codi.make_sampler(runs.open_run(os.path.join(run.workdir, stage)), steps=steps, solver=solver_used,
                                    spacing=used)
        targets, labels = sampler.cycled_targets(num)
        images, _, seconds = sampler.run(num, seed=seed)  # the pictures and the first timing: seed's
        scored = [evaluation.evaluate(images, labels, targets, evaluators_for(cfg.data.name))]
        for k in range(1, seeds):  # further sampling seeds: the same conditions, other noise
            scored.append(evaluation.evaluate(sampler.run(num, seed=seed + k)[0], labels, targets,
                                              evaluators_for(cfg.data.name)))
        label = solver_used if used in (None, "lcm") else f"{solver_used} ({used})"
        row = {"task": task, "method": stage, "sampler": label, "steps": steps,
               **{key: float(np.mean([m[key] for m in scored])) if scored[0][key] is not None else None
                  for key in scored[0]},
               "s_per_1000": seconds * 1000.0 / num}
        if seeds > 1:
            row["fd_per_seed"] = [m["fd"] for m in scored]
        rows.append(row)
        timed.append((row, sampler))
        outputs[(stage, steps)] = images[:EXAMPLES]
        first = first or sampler
        if progress:
            print(f"{task:22s} {stage:9s} {label:5s} {steps:2d} steps: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f} "
                  f"FD {row['fd']:.2f} {row['s_per_1000']:.3f} s/1000", flush=True)
    if first is None:
        raise InvalidArgument(f"{workdir} has none of the stages {sorted({r[0] for r in ROWS})}")
    channels = first.image_shape[-1]
    picture = [condition_picture(spec, first.conditions["condition"][:EXAMPLES], channels), first.targets[:EXAMPLES]]
    picture += [outputs[k] for k in PICTURE_ROWS if k in outputs]
    return rows, timed, np.concatenate(picture), task


def results_table(workdirs, *, num: int = 1000, out_dir: str | None = None, seed: int = 0,
                  progress: bool = True, spacing: str | None = None, solver: str | None = None,
                  seeds: int = 1) -> dict:
    """``solver`` (lcm or codi) and ``spacing`` (its picks from the skip grid: ``diffusion.timesteps.
    consistency_picks``): how every consistency row samples; default: each stage's config. ``seeds``:
    every metric the mean over sampling seeds ``seed``, ``seed + 1``, ... (FD from 1000 samples moves
    by several percent between seeds; each row keeps its per-seed FDs), the claims judged on the means."""
    if seeds < 1:
        raise InvalidArgument(f"seeds must be at least 1, got {seeds}")
    # before any row samples: a typo should not cost the minutes of the 50-step rows
    if solver is not None and solver not in consistency.SAMPLERS:
        raise InvalidArgument(f"--solver {solver!r}: the consistency rows sample with {', '.join(consistency.SAMPLERS)}")
    if spacing is not None and spacing not in timesteps.CONSISTENCY_SPACINGS:
        raise InvalidArgument(f"--spacing {spacing!r}: expected one of {', '.join(timesteps.CONSISTENCY_SPACINGS)}")
    rows, timed, grids = [], [], {}
    for workdir in workdirs:
        r, t, picture, task = task_rows(workdir, num, seed, progress, spacing, solver, seeds)
        rows += r
        timed += t
        grids[task.replace("/", "_").replace(" ", "_")] = picture
    evaluation.retime_round_robin(timed, num, repeats=evaluation.TIMING_REPEATS, seed=seed)
    result = {"workdirs": list(workdirs), "num": num, "seeds": list(range(seed, seed + seeds)), "rows": rows,
              "device": evaluation.device_name(),
              "checks": claims(rows)}
    if out_dir:
        evaluation.write_report(out_dir, result, format_results(result), grids)
    return result


def _get(rows, task, method, steps):
    return next((r for r in rows if r["task"] == task and r["method"] == method and r["steps"] == steps), None)


def ratio_se(row: dict, reference: dict) -> float | None:
    """The standard error of an FD ratio over sampling seeds: the spread of the per-seed ratios (both
    rows drew the same seeds) over sqrt(seeds). None for a single seed. The claims read the ratio of
    the means; this says how far another set of seeds could move it."""
    a, b = row.get("fd_per_seed"), reference.get("fd_per_seed")
    if not a or not b or len(a) < 2:
        return None
    ratios = np.asarray(a) / np.asarray(b)
    return float(ratios.std(ddof=1) / np.sqrt(len(ratios)))


def claims(rows) -> list[dict]:
    """CoDi's claims at this scale, per task, each with the numbers it was judged on."""
    out = []

    def check(task, text, value, target, ok, se=None):
        out.append({"task": task, "claim": text, "value": float(value), "target": target, "ok": bool(ok),
                    **({"se": se} if se is not None else {})})

    for task in dict.fromkeys(r["task"] for r in rows):
        ft50, ft4 = _get(rows, task, "finetune", 50), _get(rows, task, "finetune", 4)
        two4, c4, pe4 = _get(rows, task, "two_stage", 4), _get(rows, task, "codi", 4), _get(rows, task, "pe_codi", 4)
        if ft50 and c4:
            check(task, "CoDi 4 steps: PSNR within 0.3 dB of the 50-step conditional model",
                  c4["psnr"] - ft50["psnr"], ">= -0.3", c4["psnr"] >= ft50["psnr"] - 0.3)
            check(task, "CoDi 4 steps: FD at most 1.10x the 50-step conditional model's",
                  c4["fd"] / ft50["fd"], "<= 1.10", c4["fd"] <= 1.10 * ft50["fd"], ratio_se(c4, ft50))
        if ft4 and c4:
            check(task, "CoDi 4 steps: FD below the 4-step conditional model's", c4["fd"] - ft4["fd"], "< 0",
                  c4["fd"] < ft4["fd"])
        if two4 and c4:
            check(task, "CoDi 4 steps: FD below the 4-step two-stage baseline's", c4["fd"] - two4["fd"], "< 0",
                  c4["fd"] < two4["fd"])
        if ft50 and pe4:
            check(task, "PE-CoDi 4 steps: FD at most 1.25x the 50-step conditional model's",
                  pe4["fd"] / ft50["fd"], "<= 1.25", pe4["fd"] <= 1.25 * ft50["fd"], ratio_se(pe4, ft50))
        if ft50 and c4:
            check(task, "4-step sampling at least 10x faster than 50-step", ft50["s_per_1000"] / c4["s_per_1000"],
                  ">= 10", ft50["s_per_1000"] >= 10 * c4["s_per_1000"])
    return out


def format_results(result: dict) -> str:
    seeds = result.get("seeds", [0])
    drawn = f" per sampling seed, metrics the mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    lines = [f"Conditional distillation: {result['num']} samples per row{drawn} (the held-out split's conditions, "
             f"cycled), {result['device']}; wall time: the best of 3 runs round-robin over all rows, compilation "
             "excluded", "",
             "| task | method | sampler | steps | PSNR | SSIM | FD | class acc | s / 1000 samples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"{r['class_acc']:.3f}" if r.get("class_acc") is not None else "-"
        lines.append(f"| {r['task']} | {r['method']} | {r['sampler']} | {r['steps']} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {r['fd']:.2f} | {acc} | {r['s_per_1000']:.3f} |")
    lines += ["", evaluation.claims_table(result["checks"], key="task")]
    return "\n".join(lines)
