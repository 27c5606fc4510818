"""The collaboration sweep's Markdown tables and its plot of FD against average evaluations."""

from __future__ import annotations

from jdistill.recipes import evaluation

STRATEGIES = ("student", "teacher", "refine_all", "adaptive_refine", "adaptive_regen")
NAMES = {"student": "student alone", "teacher": "teacher alone", "refine_all": "refine everything",
         "adaptive_refine": "adaptive refinement", "adaptive_regen": "adaptive regeneration"}
SOLVER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++ 2M", "dpmpp_sde": "DPM-Solver++ SDE", "euler": "Euler",
                "euler_ancestral": "Euler ancestral", "heun": "Heun", "unipc": "UniPC", "ddpm": "DDPM"}


def name(strategy: str, result) -> str:
    """A strategy's name in tables and plots; the teacher's names the sweep's solver (every strategy's)."""
    if strategy == "teacher":
        cfg = " + CFG" if result.get("teacher_cfg", True) else ""
        return f"teacher alone ({SOLVER_NAMES.get(result['solver'], result['solver'])}{cfg})"
    return NAMES[strategy]


def fits(row, budget: float) -> bool:
    """A budget is a cap: a row fits it when the evaluations it spent (measured, not planned: an
    oracle that refines 71.7% where it was calibrated for 70% spends over its plan) do not exceed it."""
    return row["avg_evals"] <= budget + 1e-9


def best(rows, strategy, budget):
    """The lowest-FD row of ``strategy`` planned for some budget whose spent evaluations fit
    ``budget``; None when none fits."""
    inside = [r for r in rows if r["strategy"] == strategy and r["budget"] is not None and fits(r, budget)]
    return min(inside, key=lambda r: (r["fd"], r["avg_evals"])) if inside else None


def _setting(r) -> str:
    parts = []
    if r.get("k") is not None and r["strategy"] != "refine_all":
        parts.append(f"k={r['k']:g}")
    if r.get("sigma") is not None:
        parts.append(f"sigma={r['sigma']:g}")
    if r.get("teacher_steps") is not None and r["strategy"] != "student":
        parts.append(f"{r['teacher_steps']} teacher steps")
    return ", ".join(parts) or "-"


def summary_table(result) -> str:
    """At each budget, the best setting of every strategy (lowest FD over k and sigma)."""
    rows = result["rows"]
    student = next(r for r in rows if r["strategy"] == "student")
    paired = _paired(result)
    lines = ["| budget | strategy | setting | avg steps | avg evals | FD | class acc | " + ("PSNR | " if paired else "")
             + "s / 1000 |", "|---|---|---|---|---|---|---|---|" + ("---|" if paired else "")]
    for b in result["budgets"]:
        for strategy in STRATEGIES[1:]:
            r = best(rows, strategy, b)
            if r is None:
                lines.append(f"| ~{b} | {name(strategy, result)} | nothing fits | - | - | - | - | "
                             + ("- | " if paired else "") + "- |")
                continue
            lines.append(f"| ~{b} | {name(strategy, result)} | {_setting(r)} | {r['avg_steps']:.2f} | {r['avg_evals']:.2f} | "
                         f"{r['fd']:.2f} | {r['class_acc']:.3f} | {_psnr(r, paired)}{r['s_per_1000']:.2f} |")
        lines.append(f"| ~{b} | {NAMES['student']} | {result['student']['steps']} steps | {student['avg_steps']:.2f} | "
                     f"{student['avg_evals']:.2f} | {student['fd']:.2f} | {student['class_acc']:.3f} | "
                     f"{_psnr(student, paired)}{student['s_per_1000']:.2f} |")
    return "\n".join(lines)


def _paired(result) -> bool:
    """Whether the samples have a ground truth (a conditional student's): PSNR joins the tables."""
    return any(r.get("psnr") is not None for r in result["rows"])


def _psnr(r, paired: bool) -> str:
    return f"{r['psnr']:.2f} | " if paired else ""


def full_table(result) -> str:
    paired = _paired(result)
    lines = ["| strategy | budget | setting | refined | avg evals | padded evals | FD | class acc | "
             + ("PSNR | " if paired else "") + "s / 1000 |", "|---|---|---|---|---|---|---|---|---|"
             + ("---|" if paired else "")]
    for r in result["rows"]:
        lines.append(f"| {name(r['strategy'], result)} | {r['budget'] or '-'} | {_setting(r)} | {r['refined_share']:.3f} | "
                     f"{r['avg_evals']:.2f} | {r['padded_evals']:.2f} | {r['fd']:.2f} | {r['class_acc']:.3f} | "
                     f"{_psnr(r, paired)}{r['s_per_1000']:.2f} |")
    return "\n".join(lines)


def format_results(result) -> str:
    s = result["student"]
    task = f" ({result['condition_kind']})" if result.get("condition_kind") else ""
    title = (f"Adaptive teacher-student collaboration on digits{task}: student {s['sampler']}; teacher "
             f"{', '.join(result['teacher'])}; oracle {result['oracle']['oracle']}; refinement form "
             f"{result['form']} ({result['solver']}); {result['num']} samples per row ({result['device']}; wall time: "
             "the best of the timed runs taken round-robin over all rows, compilation excluded)")
    return "\n".join([title, "", "Best setting per strategy at each budget of average network evaluations "
                      "(a CFG step is two):", "", summary_table(result), "", evaluation.claims_table(result["checks"]), "",
                      "Every row of the sweep:", "", full_table(result)])


def plot(result, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, style in (("teacher", "s-"), ("refine_all", "^-"), ("adaptive_refine", "o-"),
                            ("adaptive_regen", "v--")):
        pts = sorted((r["avg_evals"], r["fd"]) for b in result["budgets"] if (r := best(rows, strategy, b)))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name(strategy, result))
    k_rows = [r for r in rows if r["strategy"] == "adaptive_refine"]
    ax.scatter([r["avg_evals"] for r in k_rows], [r["fd"] for r in k_rows], s=10, c="grey", alpha=0.5,
               label="adaptive refinement, every k / sigma")
    student = next(r for r in rows if r["strategy"] == "student")
    ax.axhline(student["fd"], color="C4", ls=":", label=f"student alone ({student['avg_evals']:g} evals)")
    ref = next(r for r in rows if r["strategy"] == "teacher" and r["budget"] is None)
    ax.axhline(ref["fd"], color="k", ls=":", label=f"teacher, {ref['teacher_steps']} steps ({ref['avg_evals']:g} evals)")
    ax.set(xlabel="average network evaluations per sample (a CFG step is two)", ylabel="FD (held-out digits)",
           title="adaptive collaboration on digits" + (f" ({result['condition_kind']})" if result.get("condition_kind")
                                                       else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
