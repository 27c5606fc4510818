"""The main job (`make demo` / `jdistill demo`), on real handwritten digits, every stage trained with
a shipped config or reused when already trained:

1. the digits teacher (configs/digits_teacher.py): its 64-step DDIM + CFG samples scored against
   the held-out digits (FD in the shipped classifier's features, share classified as their label);
2. guided distillation (configs/digits_guided.py): stage 1 and halvings to a 1-step student, then
   the teacher-vs-student table (FD, accuracy, wall time per 1000 samples) with Meng et al.'s
   claims checked;
3. T-Stitch (configs/digits_teacher_small.py): the small teacher, and a sweep of the fraction of
   steps it takes from the large one.

Tables go to the terminal and, with the grids, to ``runs/demo/``.
"""

from __future__ import annotations

import json
import os

import jax

from jdistill import config as config_lib
from jdistill import images as images_lib
from jdistill.metrics.classifier import digits_fd, load_digits_classifier, real_vs_real_fd
from jdistill.recipes import guided, stitch, teacher
from jdistill.recipes.sample import Sampler
from jdistill.train.loop import training_seconds

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a short run that checks the whole pipeline, not the numbers
QUICK = {
    "digits_teacher": ["--config.train.steps=60", "--config.train.ckpt_every=30"],
    "digits_teacher_small": ["--config.train.steps=60", "--config.train.ckpt_every=30"],
    "digits_guided": ["--config.stage1.steps=20", "--config.progressive.start_steps=4",
                      "--config.progressive.train_steps.default=10", "--config.progressive.train_steps.2=10",
                      "--config.progressive.train_steps.1=10"],
}


def config_path(name: str) -> str:
    """A shipped config: ./configs/NAME.py, else the repository's configs folder."""
    for root in (os.getcwd(), REPO):
        path = os.path.join(root, "configs", f"{name}.py")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no configs/{name}.py under {os.getcwd()} or {REPO}")


TIMING_REPEATS = 3  # wall times are the best of 3 runs (this machine is shared)


def score(sampler: Sampler, num: int, seed: int = 0, repeats: int = TIMING_REPEATS) -> tuple[dict, object]:
    images, labels, seconds = sampler.run(num, seed=seed, repeats=repeats)
    clf = load_digits_classifier()
    row = {"sampler": sampler.description, "fd": float(digits_fd(images)),
           "class_acc": float((clf.predict(images) == labels).mean()) if labels is not None else None,
           "s_per_1000": seconds * 1000.0 / num}
    return row, images


def banner(text: str):
    print(f"\n== {text} ==", flush=True)


def main(workdir: str = "runs", num: int = 1000, quick: bool = False):
    suffix = "_quick" if quick else ""
    out_dir = os.path.join(workdir, "demo" + suffix)
    os.makedirs(out_dir, exist_ok=True)
    over = QUICK if quick else {}
    teacher_dir = os.path.join(workdir, "digits_teacher" + suffix)
    small_dir = os.path.join(workdir, "digits_teacher_small" + suffix)
    guided_dir = os.path.join(workdir, "digits_guided" + suffix)
    summary = {}

    banner("1. digits teacher")
    teacher.ensure_trained(config_path("digits_teacher"), teacher_dir, over.get("digits_teacher", []))
    tcfg = config_lib.load_config(config_path("digits_teacher"), over.get("digits_teacher", []))
    row, images = score(teacher.make_sampler(teacher_dir, steps=64, solver="ddim"), num)
    images_lib.save_grid(os.path.join(out_dir, "teacher_ddim64.png"), images[:100], ncol=10)
    ref = real_vs_real_fd(load_digits_classifier(), subsample=num)[f"train{num}_vs_test"]
    seconds = training_seconds(teacher_dir)
    summary["teacher"] = dict(row, real_vs_real_fd=ref, fd_over_real=row["fd"] / ref, train_seconds=seconds)
    print(f"{row['sampler']}: FD {row['fd']:.2f} = {row['fd'] / ref:.2f}x the real-vs-real FD {ref:.2f} "
          f"({num} train digits vs the held-out split; target <= 2.5x); {100 * row['class_acc']:.1f}% classified "
          f"as their label (target >= 95%); trained {tcfg.train.steps} steps in "
          f"{seconds / 60 if seconds else float('nan'):.1f} min on {jax.device_count()} {jax.devices()[0].platform} "
          "device(s)")

    banner("2. guided distillation (Meng et al.)")
    gover = [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config="] + over.get("digits_guided", [])
    gcfg = config_lib.load_config(config_path("digits_guided"), gover)
    if all(teacher.is_trained(os.path.join(guided_dir, name), steps)
           for name, steps in guided_stage_steps(gcfg)):
        print(f"reusing the distilled students in {guided_dir}")
    else:
        guided.train(gcfg, guided_dir)
    table = guided.results_table(guided_dir, num=num, out_dir=os.path.join(out_dir, "guided"), progress=False)
    print(guided.format_results(table))
    summary["guided"] = table["checks"]

    banner("3. T-Stitch (small teacher for the early steps)")
    teacher.ensure_trained(config_path("digits_teacher_small"), small_dir, over.get("digits_teacher_small", []))
    sweep = stitch.sweep(small_dir, teacher_dir, steps_list=(16,), fractions=[0.0, 0.2, 0.4, 0.6, 1.0], num=num,
                         out_dir=os.path.join(out_dir, "stitch"), progress=False)
    print(stitch.format_table(sweep))
    summary["stitch"] = sweep["rows"]

    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\ntables, grids and plots in {out_dir}")
    return summary


def guided_stage_steps(cfg):
    """(stage name, training steps) of every stage of a guided distillation config."""
    return [("stage1", int(cfg.stage1.steps))] + [(f"steps_{n:03d}", guided.round_steps(cfg, n))
                                                  for n in guided.rounds(cfg)]
