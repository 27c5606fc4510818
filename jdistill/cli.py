"""jdistill's command line.

    jdistill train  --config configs/digits_teacher.py [--workdir DIR] [--config.train.steps=500 ...]
    jdistill distill --config configs/digits_guided.py [--workdir DIR] [--config.KEY=VALUE ...]
    jdistill sample --workdir DIR [--num 1000] [--steps 64] [--solver ddim] [--guidance 2.0] [--out FILE.npz]
    jdistill eval   FILE.npz [--reference test]          (FD + class accuracy on digits)
    jdistill eval   PRED.npz --target TARGET.npz         (PSNR / SSIM for paired tasks)
    jdistill guided-table --workdir runs/digits_guided   (teacher vs students, Meng et al.'s claims checked)
    jdistill demo                                        (the README's main job)
    jdistill sample --workdir LARGE --stitch SMALL --fractions 0.4     (T-Stitch)
    jdistill stitch-sweep --small SMALL --large LARGE [--steps 16 64]  (table + plot over the fraction)
    jdistill stitch-pick runs/stitch/results.json --budget 0.7        (best fraction for a time budget)

Multi-process runs (GPU clusters, TPU pods, or processes over loopback) add
``--coordinator HOST:PORT --num-processes N --process-id I`` (or
``--distributed`` to let JAX detect the cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _add_distributed(p):
    g = p.add_argument_group("multi-process")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--distributed", action="store_true", help="auto-detect the cluster (TPU pods, SLURM)")


def _init_distributed(args):
    from jdistill.train import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def _split_overrides(argv):
    """--config.x=y items are config overrides; the rest goes to argparse."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def cmd_train(args, overrides):
    from jdistill import config as config_lib
    from jdistill.recipes import get_recipe

    _init_distributed(args)
    cfg = config_lib.load_config(args.config, overrides)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    get_recipe(cfg).train(cfg, workdir, progress=not args.quiet)
    print(f"trained: {workdir}")


def cmd_distill(args, overrides):
    from jdistill import config as config_lib
    from jdistill.recipes import get_recipe

    _init_distributed(args)
    cfg = config_lib.load_config(args.config, overrides)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    recipe = get_recipe(cfg)
    if not hasattr(recipe, "stage_names"):
        raise config_lib.ConfigError(f"{args.config} is a {cfg.get('recipe')!r} config; `distill` runs distillation "
                                     "recipes (use `train` for teachers)")
    recipe.train(cfg, workdir, progress=not args.quiet)
    print(f"distilled: {workdir}")


def cmd_guided_table(args, overrides):
    from jdistill.recipes import guided

    result = guided.results_table(args.workdir, guidance_scales=args.guidance, num=args.num, out_dir=args.out)
    print(guided.format_results(result))
    if args.out:
        print(f"table and grids in {args.out}")


def cmd_sample(args, overrides):
    from jdistill.recipes import sample as sample_lib

    if args.config:
        from jdistill import config as config_lib
        from jdistill.recipes import stitch as stitch_lib

        cfg = config_lib.load_config(args.config, overrides)
        if cfg.get("recipe") != "stitch" or "task" not in cfg:
            raise config_lib.ConfigError(f"{args.config}: `sample --config` takes a pretrained-pair stitch config "
                                         "(configs/stitch_*.py); trained models are sampled with --workdir")
        out = stitch_lib.save_config_samples(cfg, args.out or "samples.npz", num=args.num, seed=args.seed)
        print(f"{out['description']}: wrote {out['npz']} ({out['num']} samples, {out['seconds']:.1f} s) and {out['png']}")
        return
    if not args.workdir:
        raise ValueError("sample needs --workdir (a trained model) or --config (a stitch config)")
    out = sample_lib.sample_to_file(args.workdir, args.out, num=args.num or 1000, steps=args.steps, solver=args.solver,
                                    guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
                                    stochastic=args.stochastic, stitch=args.stitch, fractions=args.fractions,
                                    stitch_mode=args.stitch_mode)
    print(f"{out['description']}: wrote {out['npz']} ({out['num']} samples, {out['seconds']:.2f} s) and {out['png']}")


def cmd_stitch_sweep(args, overrides):
    from jdistill.recipes import stitch as stitch_lib

    fractions = np.round(np.arange(0.0, 1.0 + 1e-9, args.fraction_step), 4) if args.fractions is None else args.fractions
    result = stitch_lib.sweep(args.small, args.large, steps_list=args.steps, fractions=list(fractions), num=args.num,
                              out_dir=args.out, guidance_scale=args.guidance, solver=args.solver, seed=args.seed)
    print(stitch_lib.format_table(result))
    print(f"table, plot and grids in {args.out}")


def cmd_stitch_pick(args, overrides):
    from jdistill.recipes import stitch as stitch_lib

    with open(args.results) as f:
        result = json.load(f)
    best = stitch_lib.pick(result, budget=args.budget, seconds=args.seconds, steps=args.steps)
    print(f"pick: {best['steps']} steps, fraction {best['fraction']:.1f} on the small model -> FD {best['fd']:.2f} "
          f"({best['fd_vs_large']:.3f}x the large model), {best['s_per_1000']:.2f} s / 1000 samples "
          f"({best['time_vs_large']:.3f}x the large model)")


def cmd_eval(args, overrides):
    from jdistill.recipes import sample as sample_lib

    for key, value in sample_lib.evaluate_file(args.samples, reference=args.reference, target=args.target).items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def cmd_demo(args, overrides):
    from jdistill.recipes import demo

    demo.main(workdir=args.workdir, num=args.num, quick=args.quick)


def build_parser():
    p = argparse.ArgumentParser(prog="jdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config file")
    t.add_argument("--config", required=True)
    t.add_argument("--workdir")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed(t)
    t.set_defaults(fn=cmd_train)

    di = sub.add_parser("distill", help="run a distillation recipe (every stage, resumable)")
    di.add_argument("--config", required=True)
    di.add_argument("--workdir")
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed(di)
    di.set_defaults(fn=cmd_distill)

    gt = sub.add_parser("guided-table", help="teacher vs distilled students: FD / accuracy / time table + targets")
    gt.add_argument("--workdir", required=True, help="the guided distillation's workdir")
    gt.add_argument("--guidance", nargs="+", type=float, default=[1.5, 2.0])
    gt.add_argument("--num", type=int, default=1000)
    gt.add_argument("--out")
    gt.set_defaults(fn=cmd_guided_table)

    s = sub.add_parser("sample", help="sample from a trained model into .npz (+ a PNG grid)")
    s.add_argument("--workdir", help="a trained model's workdir")
    s.add_argument("--config", help="a pretrained-pair stitch config (configs/stitch_*.py); takes --config.KEY=VALUE")
    s.add_argument("--out")
    s.add_argument("--num", type=int, help="how many samples (default 1000; a stitch config: its labels / prompts)")
    s.add_argument("--steps", type=int)
    s.add_argument("--solver")
    s.add_argument("--guidance", type=float, help="guidance scale g (diffusers' convention; Meng's w = g - 1)")
    s.add_argument("--stochastic", action="store_true", help="distilled students: the N-step stochastic sampler")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--stitch", nargs="+", metavar="WORKDIR",
                   help="T-Stitch: smaller models' workdirs (small to large) that take the early steps")
    s.add_argument("--fractions", nargs="+", type=float, help="T-Stitch: fraction of the trajectory per --stitch model")
    s.add_argument("--stitch-mode", default="timestep", choices=["timestep", "step"])
    s.set_defaults(fn=cmd_sample)

    sw = sub.add_parser("stitch-sweep", help="T-Stitch speed / quality sweep over the fraction: table + plot")
    sw.add_argument("--small", required=True)
    sw.add_argument("--large", required=True)
    sw.add_argument("--steps", nargs="+", type=int, default=[16, 64])
    sw.add_argument("--fractions", nargs="+", type=float)
    sw.add_argument("--fraction-step", type=float, default=0.1)
    sw.add_argument("--num", type=int, default=1000)
    sw.add_argument("--guidance", type=float, default=1.5)
    sw.add_argument("--solver", default="ddim")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--out", default="runs/stitch")
    sw.set_defaults(fn=cmd_stitch_sweep)

    sp = sub.add_parser("stitch-pick", help="the best fraction for a time budget, from a stitch-sweep's results.json")
    sp.add_argument("results")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=float, help="time relative to the large model alone (e.g. 0.7)")
    g.add_argument("--seconds", type=float, help="seconds per 1000 samples")
    sp.add_argument("--steps", type=int, help="only this step count")
    sp.set_defaults(fn=cmd_stitch_pick)

    e = sub.add_parser("eval", help="score samples: FD + class accuracy (digits) or PSNR / SSIM (paired)")
    e.add_argument("samples")
    e.add_argument("--reference", default="test", choices=["test", "train"])
    e.add_argument("--target", help="paired ground truth .npz (images uint8) for PSNR / SSIM")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="the main job: digits teacher (trained or reused), samples, FD / time table")
    d.add_argument("--workdir", default="runs")
    d.add_argument("--num", type=int, default=1000)
    d.add_argument("--quick", action="store_true", help="a short run to check the pipeline, not the numbers")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="PyTorch checkpoint (file, diffusers folder, pipeline) -> Orbax", add_help=False)
    c.set_defaults(fn=None)
    return p


def _known_errors():
    from jdistill.config import ConfigError
    from jdistill.convert.engine import ConversionError
    from jdistill.data.pipeline import DatasetNotAvailableError, ImageShapeError
    from jdistill.train.checkpoint import CheckpointError

    return (ConfigError, ConversionError, DatasetNotAvailableError, ImageShapeError, CheckpointError,
            FileNotFoundError, ValueError)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from jdistill.convert.cli import main_convert

        return main_convert(argv[1:])
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if overrides and not (args.command in ("train", "distill") or getattr(args, "config", None)):
        build_parser().error(f"--config.* overrides need a --config file, got {overrides}")
    try:
        args.fn(args, overrides)
    except _known_errors() as e:
        print(f"jdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
