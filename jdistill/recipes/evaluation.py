"""Evaluation: samplers, a registry of evaluators, fair wall times, and reports on disk.

    sampler = teacher.make_sampler(run, steps=64)          # a compiled way to draw samples
    row, images = score(sampler, 1000, evaluators=("digits",))
    retime_round_robin([(row, sampler), ...], 1000, repeats=3)
    write_report("runs/table", result, markdown, grids={"teacher_64": images})

Evaluators are registered by name, as big_vision's ``config.evals`` are: ``digits`` (FD in
the shipped classifier's features against the held-out split, and the share of samples
classified as their label), ``paired`` (PSNR / SSIM against targets). A results command
lists the evaluators its rows need; each writes its numbers into the row. Reports are
JSON (every number), Markdown (the table) and PNG grids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from jdistill import images as images_lib
from jdistill.diffusion.timesteps import TimeGrid, make_grid
from jdistill.models import registry
from jdistill.sampling import samplers
from jdistill.sampling.generate import generate

TIMING_REPEATS = 3  # wall times are the best of 3 runs (these machines are shared)


@dataclasses.dataclass
class Sampler:
    """A compiled way to draw samples: ``fn(noise, cond, key) -> images`` and what it needs."""

    fn: Callable
    image_shape: tuple
    num_classes: int | None
    description: str
    model_calls_per_step: int = 1
    solver: str | None = None  # the sampler's solver where it is one of the library's (a two-call one counts twice)
    plan: object = None  # stitched samplers: which model serves which steps
    conditions: dict | None = None  # conditional models: per-sample condition arrays (cycled to ``num``)
    targets: np.ndarray | None = None  # paired tasks: the ground truth of each condition (uint8, cycled)
    source_labels: np.ndarray | None = None  # digits tasks: the class of each ground truth (cycled)
    condition_kind: str | None = None  # conditional models: what the conditions are ("inpaint", "sr2", ...)

    @classmethod
    def for_denoiser(cls, den, *, steps: int, solver: str, guidance_scale=None, num_classes=None, grid: TimeGrid = None,
                     description: str = "", extra_cond: dict | None = None):
        grid = grid if grid is not None else make_grid(den.schedule, steps, solver)

        def fn(noise, cond, key):
            if extra_cond:
                cond = {**(cond or {}), **{k: np.full((noise.shape[0],), v, np.float32) for k, v in extra_cond.items()}}
            return samplers.sample_jit(den, noise, cond, grid=grid, solver=solver, rng=key,
                                       guidance_scale=guidance_scale)

        return cls(fn=fn, image_shape=registry.image_shape(den.module), num_classes=num_classes,
                   description=description, solver=solver,
                   # the scale reaches guided_output traced (sample_jit): any scale, 1 too, runs two passes
                   model_calls_per_step=1 if guidance_scale is None else 2)

    def labels(self, num: int):
        return None if not self.num_classes else (np.arange(num) % self.num_classes).astype(np.int32)

    def run(self, num: int, *, seed: int = 0, batch_size: int = 500, progress: bool = False, repeats: int = 1):
        """(uint8 images (N, H, W, C), labels or None, seconds; the best of ``repeats`` timings)."""
        labels = self.labels(num)
        images, seconds = generate(self.fn, self.image_shape, labels, num=num, batch_size=min(batch_size, num),
                                   seed=seed, progress=progress, repeats=repeats, conditions=self.cycled(num))
        return images_lib.to_uint8(images), labels, seconds

    def cycled(self, num: int) -> dict | None:
        """The per-sample conditions for ``num`` samples (the evaluation set repeated)."""
        if not self.conditions:
            return None
        return {k: np.asarray(v)[np.arange(num) % len(v)] for k, v in self.conditions.items()}

    def with_conditions_of(self, other: "Sampler") -> "Sampler":
        """This sampler drawing the samples ``other`` draws: its labels, or its conditions and their
        ground truth (a collaboration's teacher sampling for a conditional student)."""
        return dataclasses.replace(self, num_classes=other.num_classes, conditions=other.conditions,
                                   targets=other.targets, source_labels=other.source_labels,
                                   condition_kind=other.condition_kind)

    def evaluators(self, base=("digits",)) -> tuple[str, ...]:
        """``base`` (FD), plus PSNR / SSIM where the samples have a ground truth."""
        return tuple(base) + (("paired",) if self.targets is not None else ())

    def evaluate(self, images, labels, base=("digits",)) -> dict:
        """Every evaluator that applies to ``images`` drawn by :meth:`run` (labels: as it returned them;
        a conditional model's class share is against its conditions' ground-truth classes)."""
        targets, source = self.cycled_targets(len(images))
        return evaluate(images, labels if source is None else source, targets, self.evaluators(base))

    def cycled_targets(self, num: int):
        """(ground truth, its labels) of ``num`` samples of a paired task, or Nones."""
        rows = np.arange(num)
        return (None if self.targets is None else np.asarray(self.targets)[rows % len(self.targets)],
                None if self.source_labels is None else np.asarray(self.source_labels)[rows % len(self.source_labels)])


# -- evaluators ----------------------------------------------------------------------

EVALUATORS: dict[str, Callable] = {}


def register(name: str):
    def add(fn):
        EVALUATORS[name] = fn
        return fn

    return add


@register("digits")
def digits(images, labels=None, targets=None) -> dict:
    """FD against the held-out digits in the shipped classifier's features; share classified as their label."""
    from jdistill.metrics.classifier import digits_fd, load_digits_classifier

    out = {"fd": float(digits_fd(images))}
    out["class_acc"] = (float(np.mean(load_digits_classifier().predict(images) == labels))
                        if labels is not None else None)
    return out


@register("paired")
def paired(images, labels=None, targets=None) -> dict:
    """Mean PSNR / SSIM against the ground truth of a paired task. SSIM's window is Wang et al.'s
    (Gaussian sigma 1.5, 11 x 11) where it fits, else sigma 0.5 (5 x 5: the 8x8 digits)."""
    from jdistill.metrics.image import psnr, ssim

    if targets is None:
        raise ValueError("the paired evaluator needs targets")
    sigma = 1.5 if min(np.shape(images)[1:3]) >= 11 else 0.5
    return {"psnr": float(np.mean(psnr(images, targets))), "ssim": float(np.mean(ssim(images, targets, sigma=sigma)))}


@register("photos")
def photos(images, labels=None, targets=None) -> dict:
    """FD against the held-out photo_patches crops in the shipped photo classifier's features."""
    from jdistill.metrics.photo_classifier import photo_fd

    return {"fd": float(photo_fd(images))}


def evaluate(images, labels=None, targets=None, evaluators=("digits",)) -> dict:
    out = {}
    for name in evaluators:
        if name not in EVALUATORS:
            raise ValueError(f"unknown evaluator {name!r}; known: {sorted(EVALUATORS)}")
        out.update(EVALUATORS[name](images, labels, targets))
    return out


def score(sampler: Sampler, num: int, seed: int = 0, repeats: int = TIMING_REPEATS,
          evaluators=("digits",)) -> tuple[dict, np.ndarray]:
    """Draw ``num`` samples, evaluate them and time them: (row, uint8 images)."""
    images, labels, seconds = sampler.run(num, seed=seed, repeats=repeats)
    row = {"sampler": sampler.description, **evaluate(images, labels, None, evaluators),
           "s_per_1000": seconds * 1000.0 / num}
    return row, images


def retime_round_robin(timed: list[tuple[dict, Sampler]], num: int, *, repeats: int, seed: int = 0,
                       batch_size: int = 500) -> None:
    """Time every (row, sampler) ``repeats - 1`` more times, round-robin over all of them, keeping
    each row's best ``s_per_1000``: a slow spell of a shared machine then hits all rows alike
    instead of the few that happened to run during it."""
    for _ in range(repeats - 1):
        for row, sampler in timed:
            _, _, seconds = sampler.run(num, seed=seed, batch_size=batch_size)
            row["s_per_1000"] = min(row["s_per_1000"], seconds * 1000.0 / num)


def write_report(out_dir: str, result: dict, markdown: str, grids: dict | None = None) -> dict:
    """``results.json`` (every number), ``results.md`` (the table) and one PNG grid per entry of ``grids``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown + "\n")
    for name, images in (grids or {}).items():
        paths[name] = images_lib.save_grid(os.path.join(out_dir, f"{name}.png"), np.asarray(images)[:100], ncol=10)
    return paths


def claims_table(checks: list[dict], key: str | None = None) -> str:
    """The paper's claims as a Markdown table (``key``: a leading column, e.g. the task or g; a claim's
    ``se``, where it has one, printed after its value)."""
    head, rule = ("| claim | value | target | met |", "|---|---|---|---|")
    if key:
        head, rule = f"| {key} {head}", f"|---{rule}"
    lines = [head, rule]
    for c in checks:
        lead = "" if not key else f"| {c[key]:g} " if isinstance(c[key], (int, float)) else f"| {c[key]} "
        value = f"{c['value']:.3f}" + (f" ± {c['se']:.3f}" if c.get("se") is not None else "")
        lines.append(f"{lead}| {c['claim']} | {value} | {c['target']} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)


def device_name() -> str:
    import jax

    return f"{jax.devices()[0].platform} x{jax.device_count()}"
