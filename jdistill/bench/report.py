"""Numbers from raw call times: medians, throughput, ratios to PyTorch, FLOP/s and MFU; the table."""

from __future__ import annotations

import json
import statistics
import sys

from jdistill.bench.specs import TASK_NAMES


def summarise(results: list[dict]) -> list[dict]:
    """One dict per (model, implementation, task) with everything the table shows."""
    out = []
    for res in results:
        spec, jax_build = res["spec"], res["build"].get("jax", {})
        device = jax_build.get("device", {})
        by_key = {(r["impl"], r["task"]): r for r in res["rows"]}
        for row in res["rows"]:
            times = [t[0] for t in row["times"]]
            sec = statistics.median(times) if times else None
            entry = dict(model=res["model"], dtype=res["dtype"], task=row["task"], impl=row["impl"], seconds=sec,
                         best_seconds=min(times) if times else None, calls=len(times), error=row["error"],
                         cpu_seconds=statistics.median(t[1] for t in row["times"]) if times else None,
                         warmup_s=row.get("warmup_s"), peak_bytes=row.get("peak_bytes"), batch=spec["batch"])
            if row["impl"] == "jdistill" and row["task"] == "train":
                entry.update(compile_s=jax_build.get("train_compile_s"), flops=jax_build.get("train_flops"),
                             compiled_bytes=jax_build.get("train_compiled_bytes"), params=jax_build.get("params"))
            if sec:
                entry["samples_per_s"] = spec["batch"] / sec
                for ref in ("eager", "compile"):
                    other = by_key.get((ref, row["task"]))
                    if other and other["times"]:
                        entry[f"speed_vs_{ref}"] = statistics.median(t[0] for t in other["times"]) / sec
                if entry.get("flops"):
                    entry["flops_per_s"] = entry["flops"] / sec
                    if device.get("peak_bf16"):
                        entry["mfu"] = entry["flops_per_s"] / device["peak_bf16"]
            out.append(entry)
    return out


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def _bytes(n):
    return "-" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(results: list[dict]) -> str:
    head = ("| model | dtype | task | implementation | s / call | CPU s / call | samples/s | speed vs eager "
            "| speed vs compile | achieved FLOP/s | MFU | peak memory | compile / warm-up s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for e in summarise(results):
        if e["error"] and e["seconds"] is None:
            lines.append(f"| {e['model']} | {e['dtype']} | {TASK_NAMES.get(e['task'], e['task'])} | {e['impl']} | "
                         f"error: {e['error'][:120]} |" + " |" * 9)
            continue
        flops = e.get("flops_per_s")
        memory = e.get("peak_bytes") or e.get("compiled_bytes")
        memory_note = "" if e.get("peak_bytes") or not e.get("compiled_bytes") else " (XLA plan)"
        lines.append(" | ".join([
            f"| {e['model']}", e["dtype"], TASK_NAMES.get(e["task"], e["task"]), e["impl"], _fmt(e["seconds"], ".3f"),
            _fmt(e["cpu_seconds"], ".3f"),
            _fmt(e.get("samples_per_s"), ".1f"),
            _fmt(e.get("speed_vs_eager"), ".2f") + ("x" if e.get("speed_vs_eager") else ""),
            _fmt(e.get("speed_vs_compile"), ".2f") + ("x" if e.get("speed_vs_compile") else ""),
            "-" if not flops else f"{flops / 1e12:.3f} T" if flops >= 1e11 else f"{flops / 1e9:.1f} G",
            _fmt(e.get("mfu"), ".1%"), _bytes(memory) + memory_note,
            _fmt(e.get("compile_s") or e.get("warmup_s"), ".1f"),
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m jdistill.bench.report A.json B.json ...``: one table from several runs' JSON."""
    results = []
    for path in (argv if argv is not None else sys.argv[1:]):
        with open(path) as f:
            results += json.load(f)["results"]
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
