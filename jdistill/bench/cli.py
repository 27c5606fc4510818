"""``jdistill bench`` / ``python -m jdistill.bench``: jdistill against PyTorch on the same model.

    python -m jdistill.bench                          # the CPU models, fp32
    python -m jdistill.bench --preset gpu             # DiT-S/2, DiT-XL/2, SD1.5 UNet, bf16
    python -m jdistill.bench --models dit-cpu --tasks train --rounds 7 --json out.json

Prints one Markdown table (per model, task and implementation: seconds per call, samples/s,
speed relative to PyTorch eager and torch.compile, XLA's FLOP/s and MFU of the train step,
peak memory, compile / warm-up time) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import sys

from jdistill.bench import run as run_lib
from jdistill.bench.specs import EXTRA_TASKS, MODELS, PRESETS, TASKS
from jdistill.errors import InvalidArgument, UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jdistill bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="which models (default: cpu)")
    p.add_argument("--models", help=f"comma-separated models instead of the preset's; known: {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, help="batch size for every model (default: each model's own)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (params stay float32); default float32 on cpu, bfloat16 on gpu")
    p.add_argument("--torch", default="eager,compile",
                   help="PyTorch variants to time: eager, compile, both (default) or none")
    p.add_argument("--single-thread", action="store_true",
                   help="one CPU thread per framework (steadier timings on a shared machine)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--model-timeout", type=float, default=1800.0, help="seconds per model before it is cut off")
    p.add_argument("--json", default="bench.json", help="where to write the numbers (default bench.json)")
    return p


def main(argv=None) -> int:
    """Runs the benchmark; returns the exit status (2, with one line, on a bad argument)."""
    try:
        return _main(argv)
    except UserError as e:
        print(f"jdistill bench: error: {e}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    args = parser().parse_args(argv)
    names = args.models.split(",") if args.models else list(PRESETS[args.preset])
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise InvalidArgument(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    known = TASKS + tuple(EXTRA_TASKS)
    bad = [t for t in tasks if t not in known]
    if bad:
        raise InvalidArgument(f"unknown tasks {bad}; known: {', '.join(known)}")
    torch_impls = tuple(i for i in args.torch.split(",") if i and i != "none")
    specs = [MODELS[n] if args.batch is None else MODELS[n].with_batch(args.batch) for n in names]
    dtype = args.dtype or ("bfloat16" if args.preset == "gpu" else "float32")
    opts = run_lib.Options(tasks=tasks, torch_impls=torch_impls, dtype=dtype, rounds=args.rounds,
                           model_timeout=args.model_timeout, single_thread=args.single_thread)
    run_lib.run(specs, opts, args.json, log=lambda s: print(s, flush=True))
    return 0
