"""T-Stitch experiments: stitched sampling from trained models, the speed / quality sweep over the
fraction, and picking a fraction for a time budget.

    jdistill sample --workdir runs/digits_teacher --stitch runs/digits_teacher_small --fractions 0.4
    jdistill stitch-sweep --small runs/digits_teacher_small --large runs/digits_teacher --steps 16 64
    jdistill stitch-pick runs/stitch/results.json --budget 0.7

Members are runs of any recipe (``recipes/members.py``): each applies guidance its own
way; only z_t passes between them. Pretrained public pairs (DiT-S -> DiT-XL, BK-SDM ->
SD1.5) are in ``recipes/stitch_pretrained.py``.
"""

from __future__ import annotations

import os

import numpy as np

from jdistill.diffusion.timesteps import make_grid
from jdistill.errors import InvalidArgument, check_finite, check_positive_int, check_seed
from jdistill.files import check_output_dir
from jdistill.models import registry
from jdistill.recipes import evaluation
from jdistill.recipes import members as members_lib
from jdistill.recipes.common import check_sampling
from jdistill.recipes.evaluation import Sampler
from jdistill.sampling import stitch


def check_fractions(fractions) -> list[float]:
    """Fractions of the trajectory, each a finite number in [0, 1]."""
    out = []
    for f in fractions:
        f = check_finite("fraction", f)
        if not 0.0 <= f <= 1.0:
            raise InvalidArgument(f"a fraction must be in [0, 1], got {f:g}")
        out.append(f)
    return out


def stitched_sampler(members: list[members_lib.Member], fractions, *, steps: int, solver: str = "ddim",
                     mode: str = "timestep") -> Sampler:
    """A Sampler running ``members`` (small to large) with ``fractions`` of the trajectory each."""
    for m in members:
        m.check_steps(steps, "stitched sampling")
    ref = members[-1].denoiser
    grid = make_grid(ref.schedule, steps, solver)
    dens = [m.denoiser for m in members]
    plan = stitch.plan(grid, ref.schedule, fractions, mode, solver=solver)
    # conditional members sample the conditions of their partner's samples (a collaboration's), not labels
    k = None if members_lib.condition_kind(members, "stitched sampling") else registry.num_classes(ref.module)

    def fn(noise, cond, key):
        conds = [m.cond(cond, noise.shape[0]) for m in members]
        return stitch.sample(dens, list(fractions), noise, conds, grid=grid, solver=solver, rng=key, mode=mode,
                             guidance_scales=[m.guidance_scale for m in members])

    frac = "/".join(f"{f:g}" for f in fractions)
    desc = f"stitch {'+'.join(m.name for m in members)} r={frac} {solver} {steps} steps"
    return Sampler(fn=fn, image_shape=registry.image_shape(ref.module), num_classes=k, description=desc, plan=plan)


def _unconditional(members):
    if members_lib.condition_kind(members, "stitched sampling"):
        raise InvalidArgument(f"{members[0].name} samples for condition images; stitched sampling draws class-"
                              "conditional images (a conditional model is a collaboration's teacher: collab-sweep)")
    return members


def make_sampler(large_workdir: str, small_workdirs, fractions, *, steps: int, solver: str = "ddim",
                 guidance_scale: float = 1.5, mode: str = "timestep") -> Sampler:
    """``fractions`` for the small models (in order); the large one serves the rest."""
    fractions = check_fractions(fractions)
    if len(fractions) != len(small_workdirs):
        raise InvalidArgument(f"{len(small_workdirs)} small models but {len(fractions)} fractions")
    if sum(fractions) > 1.0 + 1e-9:
        raise InvalidArgument(f"the fractions {fractions} add up to {sum(fractions):g}; the small models can take "
                              "at most the whole trajectory (1)")
    check_sampling(steps, solver, guidance_scale)
    nets = _unconditional([members_lib.load(w, guidance_scale) for w in list(small_workdirs) + [large_workdir]])
    return stitched_sampler(nets, fractions + [1.0 - sum(fractions)], steps=steps, solver=solver, mode=mode)


def sweep(small: str, large: str, *, steps_list=(16, 64), fractions=None, num: int = 1000, out_dir: str,
          guidance_scale: float = 1.5, solver: str = "ddim", seed: int = 0, batch_size: int = 500,
          progress: bool = True, repeats: int = 3) -> dict:
    """FD, class accuracy and wall time per 1000 samples for every (steps, fraction); table + plot."""
    fractions = [round(f, 4) for f in check_fractions(fractions if fractions is not None else np.linspace(0, 1, 11))]
    steps_list = [check_positive_int("--steps", n) for n in steps_list]
    if not steps_list:
        raise InvalidArgument("--steps: give at least one step count")
    check_sampling(None, solver, guidance_scale)
    check_positive_int("--num", num)
    check_seed(seed, "--seed")
    check_output_dir(out_dir)
    nets = _unconditional([members_lib.load(w, guidance_scale) for w in (small, large)])
    rows, timed, grids = [], [], {}
    for steps in steps_list:
        for r in fractions:
            sampler = stitched_sampler(nets, [r, 1.0 - r], steps=steps, solver=solver)
            images, labels, seconds = sampler.run(num, seed=seed, batch_size=batch_size)
            calls = sampler.plan.calls()
            row = {"steps": steps, "fraction": r, "small_calls": calls[0], "large_calls": calls[1],
                   **evaluation.evaluate(images, labels), "s_per_1000": seconds * 1000.0 / num}
            rows.append(row)
            timed.append((row, sampler))
            if progress:
                print(f"steps {steps:3d} r={r:.1f}: FD {row['fd']:.2f} acc {row['class_acc']:.3f} "
                      f"{row['s_per_1000']:.2f} s/1000", flush=True)
            if r in (0.0, 0.4, 1.0):
                grids[f"stitch_{steps}steps_r{r:.1f}"] = images
    evaluation.retime_round_robin(timed, num, repeats=repeats, seed=seed, batch_size=batch_size)
    for row in rows:  # relative to the large model alone at the same step count
        base = next((b for b in rows if b["steps"] == row["steps"] and b["fraction"] == 0.0), None)
        row["fd_vs_large"] = row["fd"] / base["fd"] if base else None
        row["time_vs_large"] = row["s_per_1000"] / base["s_per_1000"] if base else None
    # The cost ratio that matters is the one inside the sampling loop, where a step is one
    # model call plus the same solver update for either model: the large model alone over the
    # small one alone. (A standalone call benchmark misleads here: it overstated it by 30%.)
    cost_ratio = {row["steps"]: base["s_per_1000"] / row["s_per_1000"]
                  for row in rows if row["fraction"] == 1.0
                  for base in rows if base["steps"] == row["steps"] and base["fraction"] == 0.0}
    result = {"small": small, "large": large, "guidance_scale": guidance_scale, "solver": solver, "num": num,
              "call_cost_ratio": cost_ratio, "device": evaluation.device_name(), "rows": rows}
    evaluation.write_report(out_dir, result, format_table(result), grids)
    plot(result, os.path.join(out_dir, "sweep.png"))
    return result


def format_table(result: dict) -> str:
    ratio = ", ".join(f"{v:.1f}x at {k} steps" for k, v in result["call_cost_ratio"].items())
    title = (f"T-Stitch sweep: {result['small']} -> {result['large']}, {result['solver']}, CFG g="
             f"{result['guidance_scale']:g}, {result['num']} samples ({result['device']}); large/small cost per "
             f"sampling step (fraction 0 vs 1): {ratio or 'n/a (fraction 1 not swept)'}")
    lines = [title, "",
             "Wall time: the best of 3 runs taken round-robin over all rows, compilation excluded.", "",
             "| steps | fraction | small calls | large calls | FD | FD / large | class acc | s / 1000 | time / large |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['fraction']:.1f} | {r['small_calls']} | {r['large_calls']} | {r['fd']:.2f} | "
                     f"{r['fd_vs_large']:.3f} | {r['class_acc']:.3f} | {r['s_per_1000']:.2f} | "
                     f"{r['time_vs_large']:.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for steps in sorted({r["steps"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["steps"] == steps]
        fr = [r["fraction"] for r in rows]
        ax_fd.plot(fr, [r["fd"] for r in rows], "o-", label=f"DDIM {steps}")
        ax_t.plot(fr, [r["s_per_1000"] for r in rows], "o-", label=f"DDIM {steps}")
    ax_fd.set(xlabel="fraction of steps on the small model", ylabel="FD (held-out digits)", title="quality")
    ax_t.set(xlabel="fraction of steps on the small model", ylabel="seconds per 1000 samples", title="wall time")
    for ax in (ax_fd, ax_t):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"T-Stitch on digits ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick(result: dict, *, budget: float | None = None, seconds: float | None = None, steps: int | None = None) -> dict:
    """The best-FD (steps, fraction) whose time fits: ``budget`` relative to the large model alone at
    the same step count, or ``seconds`` per 1000 samples. Raises if nothing fits."""
    if (budget is None) == (seconds is None):
        raise InvalidArgument("give exactly one of budget (relative time) or seconds (per 1000 samples)")
    for name, value in (("budget", budget), ("seconds", seconds)):
        if value is not None and not check_finite(name, value) > 0:
            raise InvalidArgument(f"{name} must be > 0, got {value:g}")
    needed = ("steps", "fraction", "fd", "s_per_1000", "time_vs_large")
    broken = [i for i, r in enumerate(result["rows"]) if not isinstance(r, dict) or any(k not in r for k in needed)]
    if broken or not result["rows"]:
        raise InvalidArgument(f"the results hold no sweep rows with {', '.join(needed)} (row {broken[:1]} lacks some)"
                              if broken else "the results hold no rows")
    rows = [r for r in result["rows"] if steps is None or r["steps"] == steps]
    if not rows:
        raise InvalidArgument(f"the sweep has no rows at {steps} steps; it has {sorted({r['steps'] for r in result['rows']})}")
    fits = [r for r in rows if (r["time_vs_large"] <= budget if budget is not None else r["s_per_1000"] <= seconds)]
    if not fits:
        fastest = min(rows, key=lambda r: r["s_per_1000"])
        raise InvalidArgument(f"no configuration fits the budget; the fastest is {fastest['steps']} steps at "
                         f"fraction {fastest['fraction']:.1f}: {fastest['s_per_1000']:.2f} s / 1000 "
                         f"({fastest['time_vs_large']:.2f}x the large model)")
    return min(fits, key=lambda r: (r["fd"], r["s_per_1000"]))
