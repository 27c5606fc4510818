"""jdistill's command line.

    jdistill train   --config configs/digits_teacher.py [--workdir DIR] [--config.train.steps=500 ...]
    jdistill distill --config configs/digits_guided.py [--workdir DIR] [--config.KEY=VALUE ...]
    jdistill sample  --workdir DIR [--num 1000] [--steps 64] [--solver ddim] [--guidance 2.0] [--out FILE.npz]
    jdistill sample  --config configs/stitch_dit_s_xl.py [--num 8] [--out FILE.npz]   (pretrained pairs)
    jdistill sample  --pretrained sdxl-turbo --prompt "a cat" [--steps 1] [--guidance 0] [--out cat.png]
                     (text-to-image: a preset, a diffusers pipeline folder or a converted one)
    jdistill eval    FILE.npz [--reference test]          (FD + class accuracy on digits)
    jdistill eval    PRED.npz --target TARGET.npz         (PSNR / SSIM for paired tasks)
    jdistill eval    RUN_DIR [--steps 4 ...]              (sample a run, then score it)
    jdistill guided-table --workdir runs/digits_guided   (teacher vs students, Meng et al.'s claims checked)
    jdistill synth --config configs/digits_ladd.py       (a teacher's CFG samples as a dataset, resumable)
    jdistill ladd-table --workdir RUN [RUN ...] [--compare NAME=RUN ...]  (one teacher, every method)
    jdistill lcm-table --workdir runs/digits_lcm         (teacher vs LCM student, the LCM target checked)
    jdistill codi-table --workdir RUN [RUN ...]          (CoDi / PE-CoDi vs baselines per conditional task)
    jdistill sample --workdir RUN/codi --condition FILE.npz   (a conditional model on your conditions)
    jdistill demo [PART ...] [--full | --quick]          (the README's main job)
    jdistill sample --workdir LARGE --stitch SMALL --fractions 0.4     (T-Stitch)
    jdistill stitch-sweep --small SMALL --large LARGE [--steps 16 64]  (table + plot over the fraction)
    jdistill stitch-pick runs/stitch/results.json --budget 0.7        (best fraction for a time budget)
    jdistill collab-calibrate --student RUN --student-steps 1 --out calib.json   (tau's calibration scores)
    jdistill collab-sweep --student RUN --teacher RUN --budgets 6 8 10 12  (adaptive collaboration: table + plot)
    jdistill collab-pick runs/collab/results.json --budget 10         (best setting within an evaluation budget)
    jdistill convert SRC DST                                          (PyTorch checkpoints -> Orbax)
    jdistill plan --config CONFIG --mesh data=4,fsdp=16 [--mesh ...] [--target v5p]  (pod memory / FLOPs, no pod)
    jdistill bench [--preset cpu|gpu] [--models dit-cpu ...]          (speed side by side with PyTorch)

Every workdir a command writes (a teacher, a distillation, any one of its stages) can be
sampled, evaluated and resumed. Multi-process runs (GPU clusters, TPU pods, or processes
over loopback) add ``--coordinator HOST:PORT --num-processes N --process-id I`` (or
``--distributed`` to let JAX detect the cluster).

Input a user can mend (a bad argument, config value or file) is reported in one line with
exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings

import numpy as np

from jdistill.errors import DamagedCheckpointWarning, UserError


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


def seed(text: str) -> int:
    value = int_at_least(0)(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {value}")
    return value


def fraction_step(text: str) -> float:
    value = finite_float(text)
    if not 0.01 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a step in [0.01, 1], got {value:g}")
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
    state = recipe.train(cfg, workdir, progress=not args.quiet, allow_inexact_resume=args.allow_inexact_resume)
    print(f"{'distilled' if distill else 'trained'}: {workdir}" + (" (already finished)" if state is None else ""))


def cmd_distill(args, overrides):
    cmd_train(args, overrides, distill=True)


def cmd_guided_table(args, overrides):
    from jdistill.recipes import guided_table

    result = guided_table.results_table(args.workdir, guidance_scales=args.guidance, num=args.num, out_dir=args.out)
    print(guided_table.format_results(result))
    if args.out:
        print(f"table and grids in {args.out}")


def cmd_synth(args, overrides):
    from jdistill import config as config_lib
    from jdistill.recipes import synth

    cfg = config_lib.load_config(args.config, overrides)
    if "synth" not in cfg:
        raise config_lib.ConfigError(f"{args.config} has no `synth` section (the teacher samples a recipe trains on)")
    out = synth.generate(cfg, progress=not args.quiet)
    print(f"synthetic data: {out} ({int(cfg.synth.num)} samples)")


def _compare_runs(items) -> dict:
    out = {}
    for item in items or ():
        name, sep, workdir = item.partition("=")
        if not sep or not name or not workdir:
            raise UserError(f"--compare takes NAME=WORKDIR (e.g. progressive=runs/digits_flow_guided), got {item!r}")
        out[name] = workdir
    return out


def cmd_ladd_table(args, overrides):
    from jdistill.recipes import ladd_table

    result = ladd_table.results_table(args.workdir, compare=_compare_runs(args.compare), num=args.num,
                                      out_dir=args.out, guidance_scale=args.guidance)
    print(ladd_table.format_results(result))
    if args.out:
        print(f"table and grids in {args.out}")


def _sampling_options(args) -> dict:
    return dict(steps=args.steps, solver=args.solver, guidance_scale=args.guidance, stochastic=args.stochastic,
                spacing=args.spacing, timesteps=args.timesteps)


def _given(options: dict) -> list[str]:
    """The options given (a value, 0 included, or a set flag)."""
    return [k for k, v in options.items() if v is not None and v is not False]


def _given_sampling_options(args) -> dict:
    """``_sampling_options`` keyed by their command-line flags."""
    return {"--guidance" if k == "guidance_scale" else f"--{k}": v for k, v in _sampling_options(args).items()}


def _pretrained_source(args) -> str | None:
    """The pipeline to sample text-to-image: --pretrained, or --config naming a folder or a preset
    rather than a config file."""
    if args.pretrained or not args.config or os.path.isfile(args.config):
        return args.pretrained
    from jdistill.convert import presets

    return args.config if os.path.isdir(args.config) or presets.find(args.config) else None


def cmd_sample(args, overrides):
    from jdistill.recipes import sample as sample_lib

    source = _pretrained_source(args)
    text_only = {"--prompt": args.prompt, "--negative-prompt": args.negative_prompt, "--height": args.height,
                 "--width": args.width}
    if source is not None or any(text_only.values()):
        if source is None or args.workdir or (args.pretrained and args.config) or overrides:
            given = ", ".join(k for k, v in text_only.items() if v)
            raise UserError(f"text-to-image{f' ({given})' if given else ''} takes --pretrained (a preset, or a "
                            "pipeline folder), not --workdir or a config file")
        other = _given({"--stitch": args.stitch, "--fractions": args.fractions, "--stitch-mode": args.stitch_mode,
                        "--stochastic": args.stochastic, "--spacing": args.spacing, "--timesteps": args.timesteps,
                        "--condition": args.condition})
        if other:
            raise UserError(f"{', '.join(other)}: not for text-to-image")
        if not args.prompt:
            raise UserError(f"sampling {source} needs --prompt")
        out = sample_lib.text_to_image_to_file(source, args.prompt, args.out or "samples.png",
                                               negative_prompt=args.negative_prompt, num=args.num or 1,
                                               steps=args.steps, guidance_scale=args.guidance, solver=args.solver,
                                               seed=args.seed, height=args.height, width=args.width)
        print(f"{out['description']}: wrote {out['npz'] or out['png']} ({out['num']} images, {out['seconds']:.1f} s)")
        return
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
        given = _given({**_given_sampling_options(args), "--stitch": args.stitch, "--fractions": args.fractions,
                        "--stitch-mode": args.stitch_mode, "--condition": args.condition})
        if given:  # the pair config's sample section is the sampler; its options come as overrides
            raise config_lib.ConfigError(f"{', '.join(given)}: `sample --config` samples as the config's sample "
                                         "section says; override it there (e.g. --config.sample.steps=8)")
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

    result = codi_table.results_table(args.workdir, num=args.num, out_dir=args.out, spacing=args.spacing,
                                      solver=args.solver, seeds=args.seeds)
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


def cmd_collab_calibrate(args, overrides):
    from jdistill.metrics import oracles
    from jdistill.recipes import collab

    student = collab.load_student(args.student, steps=args.student_steps, guidance_scale=args.guidance)
    calib = collab.calibrate(student, oracles.get(args.oracle), num=args.num, seed=args.seed)
    calib.save(args.out)
    taus = ", ".join(f"k={k}: {calib.tau(k):.4f}" for k in (10, 25, 50, 75, 90))
    print(f"calibrated {student.settings['sampler']} with {args.oracle} on {args.num} samples: tau {taus}; wrote {args.out}")


def cmd_collab_sweep(args, overrides):
    from jdistill.recipes import collab_report, collab_sweep

    result = collab_sweep.sweep(args.student, args.teacher, student_steps=args.student_steps,
                                guidance_scale=args.guidance, teacher_fractions=args.teacher_fractions,
                                oracle=args.oracle, budgets=args.budgets, ks=args.k, sigmas=args.sigma, form=args.form,
                                solver=args.solver, reference_steps=args.reference_steps, num=args.num,
                                calibration=args.calibration, out_dir=args.out, seed=args.seed, buckets=args.buckets,
                                repeats=args.repeats)
    print(collab_report.format_results(result))
    print(f"table, plot and grids in {args.out}")


def cmd_collab_pick(args, overrides):
    from jdistill.recipes import collab_sweep
    from jdistill.recipes.sample import read_results

    best = collab_sweep.pick(read_results(args.results), args.budget)
    print(f"pick: {best['sampler']} ({best['strategy']}) -> FD {best['fd']:.2f}, class acc {best['class_acc']:.3f}, "
          f"{best['avg_evals']:.2f} evaluations ({best['avg_steps']:.2f} steps) per sample on average, "
          f"{best['s_per_1000']:.2f} s / 1000 samples")


def cmd_eval(args, overrides):
    from jdistill.recipes import sample as sample_lib

    if os.path.isdir(args.samples):
        result = sample_lib.evaluate_run(args.samples, num=args.num or 1000, seed=args.seed, **_sampling_options(args))
    else:
        if any(v not in (None, False) for v in _sampling_options(args).values()) or args.num:
            raise UserError("--num / --steps / --solver / --guidance / --stochastic / --spacing / --timesteps are for evaluating a run "
                            f"directory; {args.samples} is a samples file")
        result = sample_lib.evaluate_file(args.samples, reference=args.reference, target=args.target)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def cmd_demo(args, overrides):
    from jdistill.recipes import parts

    parts.main(args.parts or None, workdir=args.workdir, num=args.num, quick=args.quick, full=args.full)


def cmd_plan(args, overrides):
    from jdistill.plan import report
    from jdistill.plan import run as plan_run

    if bool(args.config) == bool(args.model):
        raise UserError("plan needs --config CONFIG (a recipe's steps) or --model PRESET (one sampler step), not both")
    model = None
    if args.model:
        if not args.batch:
            raise UserError("--model needs --batch (the global batch of the sampler step)")
        model = dict(preset=args.model, batch_size=args.batch, guidance_scale=args.guidance, solver=args.solver,
                     size=args.size, dtype=args.dtype)
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else args.model.replace("/", "_")
    out_dir = args.out or os.path.join("runs", "plans", name)
    result = plan_run.plan(args.config, overrides, args.mesh or [""], model=model, devices=args.devices,
                           target=args.target, only=args.step or (), out_dir=out_dir, progress=not args.quiet)
    print(report.summary_table(result))
    print(f"plan.json and plan.md (per step: bytes by kind, FLOPs, collectives, fit per accelerator, advice) in {out_dir}")


def _add_sampling(p):
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--solver")
    p.add_argument("--guidance", type=finite_float, help="guidance scale g (diffusers' convention; Meng's w = g - 1)")
    p.add_argument("--stochastic", action="store_true", help="distilled students: the N-step stochastic sampler")
    p.add_argument("--spacing", help="consistency samplers (lcm, codi): which skip-grid timesteps they visit, "
                                     "'lcm' (LCMScheduler's) or 'quadratic' (default: the run's config)")
    p.add_argument("--timesteps", nargs="+", type=finite_float,
                   help="consistency and CoDi runs: the sampler's timesteps as a list, descending (continuous "
                        "schedules: unit times, e.g. 1.0 0.56 0.24 0.06; discrete: 999 559 239 59)")
    p.add_argument("--seed", type=seed, default=0)


def build_parser():
    p = argparse.ArgumentParser(prog="jdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, text in (("train", cmd_train, "train a model from a config file"),
                           ("distill", cmd_distill, "run a distillation recipe (every stage, resumable)")):
        t = sub.add_parser(name, help=text)
        t.add_argument("--config", required=True)
        t.add_argument("--workdir")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        t.add_argument("--allow-inexact-resume", action="store_true",
                       help="resume even though the config changes how the run proceeds (batch size, steps, optimizer, "
                            "EMA, ...): exactness is given up; printed loudly and recorded in the checkpoints")
        _add_distributed(t)
        t.set_defaults(fn=fn)

    gt = sub.add_parser("guided-table", help="teacher vs distilled students: FD / accuracy / time table + targets")
    gt.add_argument("--workdir", required=True, help="the guided distillation's workdir")
    gt.add_argument("--guidance", nargs="+", type=finite_float, default=[1.5, 2.0])
    gt.add_argument("--num", type=positive_int, default=1000)
    gt.add_argument("--out")
    gt.set_defaults(fn=cmd_guided_table)

    sy = sub.add_parser("synth", help="a teacher's samples (with CFG) written once as sharded training data")
    sy.add_argument("--config", required=True, help="a config with `teacher` and `synth` sections (configs/*_ladd.py)")
    sy.add_argument("--quiet", action="store_true", help="no progress bar")
    sy.set_defaults(fn=cmd_synth)

    lt = sub.add_parser("ladd-table", help="one flow teacher vs its LADD (per seed) and other students: FD / time")
    lt.add_argument("--workdir", required=True, nargs="+", help="LADD runs of one teacher, one per training seed")
    lt.add_argument("--compare", nargs="+", metavar="NAME=WORKDIR",
                    help="students of other recipes distilled from the same teacher (progressive, consistency)")
    lt.add_argument("--guidance", type=finite_float, help="the teacher's CFG scale (default: its config's)")
    lt.add_argument("--num", type=positive_int, default=1000)
    lt.add_argument("--out")
    lt.set_defaults(fn=cmd_ladd_table)

    s = sub.add_parser("sample", help="sample from a trained run into .npz (+ a PNG grid)")
    s.add_argument("--workdir", help="a trained run: a teacher, a distillation, or one of its stages")
    s.add_argument("--config", help="a pretrained-pair config (configs/stitch_*.py); takes --config.KEY=VALUE; "
                   "a preset or pipeline folder: as --pretrained")
    s.add_argument("--pretrained", help="text-to-image: a preset (sdxl-turbo, lcm-dreamshaper-v7, ...), a diffusers "
                   "pipeline folder or one `jdistill convert` wrote")
    s.add_argument("--prompt", nargs="+", help="text-to-image: one image per prompt (times --num)")
    s.add_argument("--negative-prompt")
    s.add_argument("--height", type=positive_int, help="text-to-image: pixels (default: the network's size)")
    s.add_argument("--width", type=positive_int)
    s.add_argument("--out", help="FILE.npz (+ a PNG grid); text-to-image also FILE.png")
    s.add_argument("--num", type=positive_int, help="how many samples (default 1000; a stitch config: its labels; "
                   "text-to-image: per prompt, default 1)")
    _add_sampling(s)
    s.add_argument("--batch-size", type=positive_int, default=500)
    s.add_argument("--stitch", nargs="+", metavar="WORKDIR",
                   help="T-Stitch: smaller models' workdirs (small to large) that take the early steps")
    s.add_argument("--fractions", nargs="+", type=fraction, help="T-Stitch: fraction of the trajectory per --stitch model")
    s.add_argument("--stitch-mode", choices=["timestep", "step"], help="with --stitch: split the trajectory by "
                                                                        "time (default) or by step count")
    s.add_argument("--condition", metavar="FILE.npz",
                   help="conditional models (CoDi): the conditions, an .npz with 'condition' (see docs/consistency.md)")
    s.set_defaults(fn=cmd_sample)

    ct = sub.add_parser("codi-table", help="CoDi / PE-CoDi vs their baselines: PSNR / SSIM / FD / time table + claims")
    ct.add_argument("--workdir", required=True, nargs="+", help="CoDi workdirs, one per conditional task")
    ct.add_argument("--num", type=positive_int, default=1000)
    ct.add_argument("--out")
    ct.add_argument("--seeds", type=positive_int, default=1,
                    help="score every row at this many sampling seeds (0, 1, ...) and report the means")
    ct.add_argument("--solver", help="the consistency rows' sampler, lcm or codi (default: the runs' configs)")
    ct.add_argument("--spacing", help="the consistency rows' skip-grid picks, 'lcm' or 'quadratic' (default: the "
                                      "runs' configs)")
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
    sw.add_argument("--fraction-step", type=fraction_step, default=0.1)
    sw.add_argument("--num", type=positive_int, default=1000)
    sw.add_argument("--guidance", type=finite_float, default=1.5)
    sw.add_argument("--solver", default="ddim")
    sw.add_argument("--seed", type=seed, default=0)
    sw.add_argument("--out", default="runs/stitch")
    sw.set_defaults(fn=cmd_stitch_sweep)

    sp = sub.add_parser("stitch-pick", help="the best fraction for a time budget, from a stitch-sweep's results.json")
    sp.add_argument("results")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=positive_float, help="time relative to the large model alone (e.g. 0.7)")
    g.add_argument("--seconds", type=positive_float, help="seconds per 1000 samples")
    sp.add_argument("--steps", type=positive_int, help="only this step count")
    sp.set_defaults(fn=cmd_stitch_pick)

    cc = sub.add_parser("collab-calibrate", help="adaptive collaboration: oracle scores of the student's samples")
    cc.add_argument("--student", required=True, help="the student's run (any recipe that samples it)")
    cc.add_argument("--student-steps", type=positive_int, default=1)
    cc.add_argument("--guidance", type=finite_float, default=1.5)
    cc.add_argument("--oracle", default="digits_confidence")
    cc.add_argument("--num", type=positive_int, default=1000)
    cc.add_argument("--seed", type=nonnegative_int, default=1, help="apart from the evaluation seed (0)")
    cc.add_argument("--out", required=True)
    cc.set_defaults(fn=cmd_collab_calibrate)

    cs = sub.add_parser("collab-sweep", help="adaptive collaboration: every strategy at evaluation budgets, table + plot")
    cs.add_argument("--student", required=True)
    cs.add_argument("--student-steps", type=positive_int, default=1)
    cs.add_argument("--teacher", nargs="+", required=True, help="the teacher's run (several: a T-Stitch teacher, small first)")
    cs.add_argument("--teacher-fractions", nargs="+", type=fraction, help="T-Stitch teacher: the smaller runs' fractions")
    cs.add_argument("--guidance", type=finite_float, default=1.5)
    cs.add_argument("--oracle", default="digits_confidence")
    cs.add_argument("--budgets", nargs="+", type=positive_float, default=[6, 8, 10, 12],
                    help="average network evaluations per sample (a CFG step is two), each a cap: every "
                         "strategy takes the most teacher steps that fit it")
    cs.add_argument("--k", nargs="+", type=finite_float, default=[30, 50, 70], help="percentiles refined")
    cs.add_argument("--sigma", nargs="+", type=fraction, default=[0.4, 0.6, 0.8], help="refinement strengths")
    cs.add_argument("--form", default="paper", choices=["paper", "img2img"])
    cs.add_argument("--solver", default="ddim")
    cs.add_argument("--reference-steps", type=positive_int, default=64)
    cs.add_argument("--num", type=positive_int, default=1000)
    cs.add_argument("--calibration", help="a collab-calibrate file (checked against these settings)")
    cs.add_argument("--buckets", type=positive_int, default=8)
    cs.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row (round-robin)")
    cs.add_argument("--seed", type=nonnegative_int, default=0)
    cs.add_argument("--out", default="runs/collab")
    cs.set_defaults(fn=cmd_collab_sweep)

    cp = sub.add_parser("collab-pick", help="the best collaboration setting within an evaluation budget")
    cp.add_argument("results")
    cp.add_argument("--budget", type=positive_float, required=True, help="average network evaluations per sample")
    cp.set_defaults(fn=cmd_collab_pick)

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

    pl = sub.add_parser("plan", help="compile a config's steps for a pod mesh on host devices: memory, FLOPs, fit")
    pl.add_argument("--config", help="a config: plan its recipe's steps (train steps, sampler steps)")
    pl.add_argument("--model", help="a preset (sdxl, sd3-medium, dit-xl-2-256, ...): plan one sampler step of it")
    pl.add_argument("--batch", type=positive_int, help="--model: global batch")
    pl.add_argument("--guidance", type=finite_float, default=None, help="--model: CFG scale (none: no guidance)")
    pl.add_argument("--solver", default="ddim", help="--model: the solver of the step")
    pl.add_argument("--size", type=positive_int, help="--model: latent size (default: the preset's)")
    pl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--model: params and compute")
    pl.add_argument("--mesh", action="append", help="data=D,fsdp=F[,tensor=T]; repeat for several meshes "
                    "(default: the config's mesh section)")
    pl.add_argument("--devices", type=positive_int, help="device count (checks the mesh, or fills in data)")
    pl.add_argument("--step", action="append", help="plan only this step (by name; repeatable)")
    pl.add_argument("--target", default="v5p", help="accelerator the advice is for: v5e, v5p, h100, h200")
    pl.add_argument("--out", help="folder for plan.json and plan.md (default runs/plans/CONFIG_NAME)")
    pl.add_argument("--quiet", action="store_true")
    pl.set_defaults(fn=cmd_plan)

    c = sub.add_parser("convert", help="PyTorch checkpoint (file, diffusers folder, pipeline) -> Orbax", add_help=False)
    c.set_defaults(fn=None)
    b = sub.add_parser("bench", help="train-step and sampling speed side by side with PyTorch (a table)",
                       add_help=False)
    b.set_defaults(fn=None)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from jdistill.convert.cli import main_convert

        return main_convert(argv[1:])
    if argv and argv[0] == "bench":
        from jdistill.bench.cli import main as main_bench

        return main_bench(argv[1:])
    rest, overrides = _split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if overrides and not getattr(args, "config", None):
        parser.error(f"--config.* overrides need a --config file, got {overrides}")
    try:
        _check_outputs_writable(args)
        with _warnings_in_one_line(args.command):
            args.fn(args, overrides)
    except UserError as e:
        print(f"jdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


WRITES_WORKDIR = ("train", "distill", "demo")  # commands whose --workdir is an output, not an input


def _check_outputs_writable(args) -> None:
    """A --workdir or --out that cannot be written is named before any work (not a traceback an hour in)."""
    from jdistill.files import check_writable

    if getattr(args, "out", None):
        check_writable(args.out, "--out")
    if args.command in WRITES_WORKDIR and getattr(args, "workdir", None):
        check_writable(args.workdir, "--workdir", folder=True)


@contextlib.contextmanager
def _warnings_in_one_line(command: str):
    """jdistill's own warnings (a damaged checkpoint skipped, ...) as one line each, like its errors."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DamagedCheckpointWarning):
            print(f"jdistill {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
