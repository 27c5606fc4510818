"""jdistill's command line.

    jdistill train   --config configs/digits_teacher.py [--workdir DIR] [--config.train.steps=500 ...]
    jdistill distill --config configs/digits_guided.py [--workdir DIR] [--config.KEY=VALUE ...]
    jdistill sample  --workdir DIR [--num 1000] [--steps 64] [--solver ddim] [--guidance 2.0] [--out FILE.npz]
    jdistill sample  --config configs/stitch_dit_s_xl.py [--num 8] [--out FILE.npz]   (pretrained pairs)
    jdistill eval    FILE.npz [--reference test]          (FD + class accuracy on digits)
    jdistill eval    PRED.npz --target TARGET.npz         (PSNR / SSIM for paired tasks)
    jdistill eval    RUN_DIR [--steps 4 ...]              (sample a run, then score it)
    jdistill guided-table --workdir runs/digits_guided   (teacher vs students, Meng et al.'s claims checked)
    jdistill lcm-table --workdir runs/digits_lcm         (teacher vs LCM student, the LCM target checked)
    jdistill codi-table --workdir RUN [RUN ...]          (CoDi / PE-CoDi vs baselines per conditional task)
    jdistill sample --workdir RUN/codi --condition FILE.npz   (a conditional model on your conditions)
    jdistill demo [PART ...] [--full | --quick]          (the README's main job)
    jdistill sample --workdir LARGE --stitch SMALL --fractions 0.4     (T-Stitch)
    jdistill stitch-sweep --small SMALL --large LARGE [--steps 16 64]  (table + plot over the fraction)
    jdistill stitch-pick runs/stitch/results.json --budget 0.7        (best fraction for a time budget)
    jdistill convert SRC DST                                          (PyTorch checkpoints -> Orbax)

Every workdir a command writes (a teacher, a distillation, any one of its stages) can be
sampled, evaluated and resumed. Multi-process runs (GPU clusters, TPU pods, or processes
over loopback) add ``--coordinator HOST:PORT --num-processes N --process-id I`` (or
``--distributed`` to let JAX detect the cluster).

Input a user can mend (a bad argument, config value or file) is reported in one line with
exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from jdistill.errors import UserError


# -- argument types: each names the accepted range --------------------------------------

def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value:g}")
    return value


# -- commands ---------------------------------------------------------------------------

def _add_distributed(p):
    g = p.add_argument_group("multi-process")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=positive_int)
    g.add_argument("--process-id", type=nonnegative_int)
    g.add_argument("--distributed", action="store_true", help="auto-detect the cluster (TPU pods, SLURM)")


def _init_distributed(args):
    from jdistill.train import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def _split_overrides(argv):
    """--config.x=y items are config overrides; the rest goes to argparse."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def _workdir(args) -> str:
    return args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])


def cmd_train(args, overrides, *, distill: bool = False):
    from jdistill import config as config_lib
    from jdistill.recipes import get_recipe

    _init_distributed(args)
    cfg = config_lib.load_config(args.config, overrides)
    recipe = get_recipe(cfg)
    if distill and recipe.command != "distill":
        raise config_lib.ConfigError(f"{args.config} is a {recipe.name!r} config; `distill` runs distillation "
                                     f"recipes (use `jdistill {recipe.command or 'sample --config'}` for it)")
    workdir = _workdir(args)
    state = recipe.train(cfg, workdir, progress=not args.quiet)
    print(f"{'distilled' if distill else 'trained'}: {workdir}" + (" (already finished)" if state is None else ""))


def cmd_distill(args, overrides):
    cmd_train(args, overrides, distill=True)


def cmd_guided_table(args, overrides):
    from jdistill.recipes import guided_table

    result = guided_table.results_table(args.workdir, guidance_scales=args.guidance, num=args.num, out_dir=args.out)
    print(guided_table.format_results(result))
    if args.out:
        print(f"table and grids in {args.out}")


def _sampling_options(args) -> dict:
    return dict(steps=args.steps, solver=args.solver, guidance_scale=args.guidance, stochastic=args.stochastic)


def cmd_sample(args, overrides):
    from jdistill.recipes import sample as sample_lib

    if args.config:
        from jdistill import config as config_lib
        from jdistill.recipes import get_recipe

        if args.workdir:
            raise config_lib.ConfigError("give --workdir (a trained run) or --config (a pretrained-pair config), not both")
        cfg = config_lib.load_config(args.config, overrides)
        recipe = get_recipe(cfg)
        if recipe.sample_config is None:
            raise config_lib.ConfigError(f"{args.config}: a {recipe.name!r} config is trained, then sampled with "
                                         "--workdir; `sample --config` takes pretrained-pair configs (configs/stitch_*.py)")
        out = recipe.sample_config(cfg, args.out or "samples.npz", num=args.num, seed=args.seed)
        print(f"{out['description']}: wrote {out['npz']} ({out['num']} samples, {out['seconds']:.1f} s) and {out['png']}")
        return
    if not args.workdir:
        raise UserError("sample needs --workdir (a trained run) or --config (a pretrained-pair config)")
    extra = {"condition": args.condition} if args.condition else {}
    out = sample_lib.sample_to_file(args.workdir, args.out, num=args.num, seed=args.seed,
                                    batch_size=args.batch_size, stitch=args.stitch, fractions=args.fractions,
                                    stitch_mode=args.stitch_mode, **_sampling_options(args), **extra)
    print(f"{out['description']}: wrote {out['npz']} ({out['num']} samples, {out['seconds']:.2f} s) and {out['png']}")


def cmd_codi_table(args, overrides):
    from jdistill.recipes import codi_table

    result = codi_table.results_table(args.workdir, num=args.num, out_dir=args.out)
    print(codi_table.format_results(result))
    if args.out:
        print(f"table and pictures in {args.out}")


def cmd_lcm_table(args, overrides):
    from jdistill.recipes import lcm_table

    result = lcm_table.results_table(args.workdir, guidance_scales=args.guidance, num=args.num, out_dir=args.out)
    print(lcm_table.format_results(result))
    if args.out:
        print(f"table and grids in {args.out}")


def cmd_stitch_sweep(args, overrides):
    from jdistill.recipes import stitch as stitch_lib

    fractions = np.round(np.arange(0.0, 1.0 + 1e-9, args.fraction_step), 4) if args.fractions is None else args.fractions
    result = stitch_lib.sweep(args.small, args.large, steps_list=args.steps, fractions=list(fractions), num=args.num,
                              out_dir=args.out, guidance_scale=args.guidance, solver=args.solver, seed=args.seed)
    print(stitch_lib.format_table(result))
    print(f"table, plot and grids in {args.out}")


def cmd_stitch_pick(args, overrides):
    from jdistill.recipes import stitch as stitch_lib
    from jdistill.recipes.sample import read_results

    best = stitch_lib.pick(read_results(args.results), budget=args.budget, seconds=args.seconds, steps=args.steps)
    print(f"pick: {best['steps']} steps, fraction {best['fraction']:.1f} on the small model -> FD {best['fd']:.2f} "
          f"({best['fd_vs_large']:.3f}x the large model), {best['s_per_1000']:.2f} s / 1000 samples "
          f"({best['time_vs_large']:.3f}x the large model)")


def cmd_eval(args, overrides):
    from jdistill.recipes import sample as sample_lib

    if os.path.isdir(args.samples):
        result = sample_lib.evaluate_run(args.samples, num=args.num or 1000, seed=args.seed, **_sampling_options(args))
    else:
        if any(v not in (None, False) for v in _sampling_options(args).values()) or args.num:
            raise UserError("--num / --steps / --solver / --guidance / --stochastic are for evaluating a run "
                            f"directory; {args.samples} is a samples file")
        result = sample_lib.evaluate_file(args.samples, reference=args.reference, target=args.target)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def cmd_demo(args, overrides):
    from jdistill.recipes import parts

    parts.main(args.parts or None, workdir=args.workdir, num=args.num, quick=args.quick, full=args.full)


def _add_sampling(p):
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--solver")
    p.add_argument("--guidance", type=finite_float, help="guidance scale g (diffusers' convention; Meng's w = g - 1)")
    p.add_argument("--stochastic", action="store_true", help="distilled students: the N-step stochastic sampler")
    p.add_argument("--seed", type=nonnegative_int, default=0)


def build_parser():
    p = argparse.ArgumentParser(prog="jdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, text in (("train", cmd_train, "train a model from a config file"),
                           ("distill", cmd_distill, "run a distillation recipe (every stage, resumable)")):
        t = sub.add_parser(name, help=text)
        t.add_argument("--config", required=True)
        t.add_argument("--workdir")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        _add_distributed(t)
        t.set_defaults(fn=fn)

    gt = sub.add_parser("guided-table", help="teacher vs distilled students: FD / accuracy / time table + targets")
    gt.add_argument("--workdir", required=True, help="the guided distillation's workdir")
    gt.add_argument("--guidance", nargs="+", type=finite_float, default=[1.5, 2.0])
    gt.add_argument("--num", type=positive_int, default=1000)
    gt.add_argument("--out")
    gt.set_defaults(fn=cmd_guided_table)

    s = sub.add_parser("sample", help="sample from a trained run into .npz (+ a PNG grid)")
    s.add_argument("--workdir", help="a trained run: a teacher, a distillation, or one of its stages")
    s.add_argument("--config", help="a pretrained-pair config (configs/stitch_*.py); takes --config.KEY=VALUE")
    s.add_argument("--out")
    s.add_argument("--num", type=positive_int, help="how many samples (default 1000; a stitch config: its labels)")
    _add_sampling(s)
    s.add_argument("--batch-size", type=positive_int, default=500)
    s.add_argument("--stitch", nargs="+", metavar="WORKDIR",
                   help="T-Stitch: smaller models' workdirs (small to large) that take the early steps")
    s.add_argument("--fractions", nargs="+", type=fraction, help="T-Stitch: fraction of the trajectory per --stitch model")
    s.add_argument("--stitch-mode", default="timestep", choices=["timestep", "step"])
    s.add_argument("--condition", metavar="FILE.npz",
                   help="conditional models (CoDi): the conditions, an .npz with 'condition' (see docs/consistency.md)")
    s.set_defaults(fn=cmd_sample)

    ct = sub.add_parser("codi-table", help="CoDi / PE-CoDi vs their baselines: PSNR / SSIM / FD / time table + claims")
    ct.add_argument("--workdir", required=True, nargs="+", help="CoDi workdirs, one per conditional task")
    ct.add_argument("--num", type=positive_int, default=1000)
    ct.add_argument("--out")
    ct.set_defaults(fn=cmd_codi_table)

    lt = sub.add_parser("lcm-table", help="teacher vs LCM student: FD / accuracy / time table + the LCM target")
    lt.add_argument("--workdir", required=True, help="the LCM distillation's workdir")
    lt.add_argument("--guidance", nargs="+", type=finite_float, default=[1.5])
    lt.add_argument("--num", type=positive_int, default=1000)
    lt.add_argument("--out")
    lt.set_defaults(fn=cmd_lcm_table)

    sw = sub.add_parser("stitch-sweep", help="T-Stitch speed / quality sweep over the fraction: table + plot")
    sw.add_argument("--small", required=True)
    sw.add_argument("--large", required=True)
    sw.add_argument("--steps", nargs="+", type=positive_int, default=[16, 64])
    sw.add_argument("--fractions", nargs="+", type=fraction)
    sw.add_argument("--fraction-step", type=positive_float, default=0.1)
    sw.add_argument("--num", type=positive_int, default=1000)
    sw.add_argument("--guidance", type=finite_float, default=1.5)
    sw.add_argument("--solver", default="ddim")
    sw.add_argument("--seed", type=nonnegative_int, default=0)
    sw.add_argument("--out", default="runs/stitch")
    sw.set_defaults(fn=cmd_stitch_sweep)

    sp = sub.add_parser("stitch-pick", help="the best fraction for a time budget, from a stitch-sweep's results.json")
    sp.add_argument("results")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=positive_float, help="time relative to the large model alone (e.g. 0.7)")
    g.add_argument("--seconds", type=positive_float, help="seconds per 1000 samples")
    sp.add_argument("--steps", type=positive_int, help="only this step count")
    sp.set_defaults(fn=cmd_stitch_pick)

    e = sub.add_parser("eval", help="score samples (FD + class accuracy on digits, PSNR / SSIM paired) or a run")
    e.add_argument("samples", help="a samples .npz, or a run directory to sample and score")
    e.add_argument("--reference", default="test", choices=["test", "train"])
    e.add_argument("--target", help="paired ground truth .npz (images uint8) for PSNR / SSIM")
    e.add_argument("--num", type=positive_int, help="run directories: how many samples (default 1000)")
    _add_sampling(e)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="the main job: every method on real digits, tables + claims (parts)")
    d.add_argument("parts", nargs="*", help="parts to run (default: all, in order)")
    d.add_argument("--workdir", default="runs")
    d.add_argument("--num", type=positive_int, default=1000)
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a short run to check the pipeline, not the numbers")
    mode.add_argument("--full", action="store_true", help="train everything from the configs: the README's tables")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="PyTorch checkpoint (file, diffusers folder, pipeline) -> Orbax", add_help=False)
    c.set_defaults(fn=None)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from jdistill.convert.cli import main_convert

        return main_convert(argv[1:])
    rest, overrides = _split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if overrides and not getattr(args, "config", None):
        parser.error(f"--config.* overrides need a --config file, got {overrides}")
    try:
        args.fn(args, overrides)
    except UserError as e:
        print(f"jdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
