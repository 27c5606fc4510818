"""A plan as Markdown: one summary table over every mesh and step, then each step in detail."""

from __future__ import annotations

from jdistill.plan.compile import COLLECTIVES

KIND_TITLES = {"params": "params", "optimizer": "optimizer state", "averages": "averages (EMA)",
               "frozen": "frozen (teacher)", "batch": "batch", "other": "step / rng / counters"}
MEMORY_TITLES = {"argument": "arguments the program reads (XLA)", "output": "outputs", "alias": "aliased (donated)",
                 "temp": "temp (activations, gradients, gathered weights)", "generated_code": "generated code",
                 "unread": "held but never read (jit drops them from the program)",
                 "peak": "peak = arguments + unread + outputs - aliased + temp + code"}
SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "CP"}


def gib(n) -> str:
    """Bytes in GiB, MiB or KiB (whichever reads best), "-" for None."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def mesh_text(mesh: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items() if k == "data" or v > 1)


def collectives_text(c: dict) -> str:
    parts = [f"{SHORT[op]} {c[op]['count']} ({gib(c[op]['bytes'])})" for op in COLLECTIVES if c[op]["count"]]
    return ", ".join(parts) or "none"


def fits_text(step: dict, target: str) -> str:
    f = step["fit"][target]
    if f["fits"]:
        return f"yes ({gib(f['headroom'])} free)"
    fix = step.get("fix")
    return f"NO: {gib(-f['headroom'])} over" + (f"; {fix['setting']} ({fix['how']})" if fix else "")


def summary_table(plan: dict) -> str:
    t = plan["target"]
    head = ("| step | devices | mesh | batch / device | params | optimizer | averages | frozen | temp | peak | "
            f"FLOPs / device | collectives (count, result bytes) | fits {t} | compile |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in plan["runs"]:
        for s in run["steps"]:
            b = s["bytes"]
            lines.append(f"| {s['name']} | {run['devices']} | {mesh_text(run['mesh'])} | {s['batch_per_device']:g} | "
                         f"{gib(b.get('params'))} | {gib(b.get('optimizer'))} | {gib(b.get('averages'))} | "
                         f"{gib(b.get('frozen'))} | {gib(s['memory']['temp'])} | {gib(s['memory']['peak'])} | "
                         f"{flops(s['flops'])} | {collectives_text(s['collectives'])} | {fits_text(s, t)} | "
                         f"{s['compile_seconds']:.0f} s |")
    return "\n".join(lines)


def step_detail(run: dict, s: dict, target: str) -> str:
    out = [f"### {s['name']} on {run['devices']} devices ({mesh_text(run['mesh'])})", ""]
    if s["description"]:
        out += [s["description"], ""]
    out += [f"Global batch {s['global_batch']} ({s['batch_per_device']:g} per device). Lowered in "
            f"{s['lower_seconds']:.1f} s, compiled in {s['compile_seconds']:.1f} s on this machine's CPU.", "",
            "| per device | bytes |", "|---|---|"]
    out += [f"| {KIND_TITLES[k]} | {gib(v)} |" for k, v in s["bytes"].items() if k in KIND_TITLES]
    out += [f"| {MEMORY_TITLES[k]} | {gib(v)} |" for k, v in s["memory"].items()]
    for name, c in s["param_counts"].items():
        dtypes = ", ".join(f"{d} {n:,}" for d, n in c["dtypes"].items())
        out.append(f"| {name} weights (elements) | {c['count']:,} ({dtypes}) |")
    if s.get("unread"):
        out += ["", "Held on the device but never read by the step (jit drops them from the program): "
                + ", ".join(f"`{k}` ({gib(v)})" for k, v in s["unread"].items()) + "."]
    loops = s.get("loops") or {}
    note = (f" (XLA counts each loop body once; loops: "
            + ", ".join(f"{k} x{v}" for k, v in loops.items()) + ")") if loops else ""
    out += ["", f"FLOPs per device per call: {flops(s['flops'])}{note}; all devices: "
            f"{flops(s['flops'] * run['devices'])}; bytes accessed per device: {gib(s['bytes_accessed'])}.", "",
            f"Collectives (per call, result bytes per device): {collectives_text(s['collectives'])}.", "",
            "| accelerator | memory | peak | fits | headroom | compute-bound time at peak |", "|---|---|---|---|---|---|"]
    for f in s["fit"].values():
        secs = f"{f['ideal_seconds'] * 1e3:.1f} ms" if f["ideal_seconds"] is not None else "-"
        out.append(f"| {f['title']} | {gib(f['capacity'])} | {gib(f['peak'])} | {'yes' if f['fits'] else 'NO'} | "
                   f"{gib(f['headroom'])} | {secs} |")
    if s.get("advice"):
        out += ["", f"Settings that change the peak on {target} (estimates; re-plan to confirm):", ""]
        for a in s["advice"]:
            est = f"est. peak {gib(a['estimated_peak'])}, {'fits' if a['fits'] else 'does not fit'}" \
                if a["estimated_peak"] is not None else "not available"
            out.append(f"- {a['setting']}" + (f" (`{a['how']}`)" if a["how"] else "") + f": {est}. {a['note']}.")
    return "\n".join(out)


def markdown(plan: dict) -> str:
    cmd = " ".join(["jdistill plan --config", plan["config"], *plan["overrides"]])
    out = [f"# Plan of {plan['config']} ({plan['recipe']} recipe)", "", f"`{cmd}`; target {plan['target']}.", "",
           summary_table(plan), ""]
    for run in plan["runs"]:
        for s in run["steps"]:
            out += [step_detail(run, s, plan["target"]), ""]
    return "\n".join(out)
