"""Sampling to files and scoring files: what `jdistill sample` and `jdistill eval` do."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from jdistill import images as images_lib
from jdistill.diffusion.timesteps import TimeGrid, make_grid
from jdistill.models import registry
from jdistill.sampling import samplers
from jdistill.sampling.generate import generate
from jdistill.train import checkpoint as ckpt_lib


@dataclasses.dataclass
class Sampler:
    """A compiled way to draw samples: ``fn(noise, cond, key) -> images`` and what it needs."""

    fn: Callable
    image_shape: tuple
    num_classes: int | None
    description: str
    model_calls_per_step: int = 1
    plan: object = None  # stitched samplers: which model serves which steps

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
                   description=description, model_calls_per_step=2 if guidance_scale is not None else 1)

    def labels(self, num: int):
        return None if not self.num_classes else (np.arange(num) % self.num_classes).astype(np.int32)

    def run(self, num: int, *, seed: int = 0, batch_size: int = 500, progress: bool = False, repeats: int = 1):
        """(uint8 images (N, H, W, C), labels or None, seconds; the best of ``repeats`` timings)."""
        labels = self.labels(num)
        images, seconds = generate(self.fn, self.image_shape, labels, num=num, batch_size=min(batch_size, num),
                                   seed=seed, progress=progress, repeats=repeats)
        return images_lib.to_uint8(images), labels, seconds


def retime_round_robin(timed: list[tuple[dict, Sampler]], num: int, *, repeats: int, seed: int = 0,
                       batch_size: int = 500) -> None:
    """Time every (row, sampler) ``repeats - 1`` more times, round-robin over all of them, keeping
    each row's best ``s_per_1000``: a slow spell of a shared machine then hits all rows alike
    instead of the few that happened to run during it."""
    for _ in range(repeats - 1):
        for row, sampler in timed:
            _, _, seconds = sampler.run(num, seed=seed, batch_size=batch_size)
            row["s_per_1000"] = min(row["s_per_1000"], seconds * 1000.0 / num)


def recipe_of(workdir: str):
    from jdistill.recipes import get_recipe

    cfg = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).read_config()
    return get_recipe(cfg.get("recipe", "teacher"))


def sample_to_file(workdir: str, out: str | None = None, *, num: int = 1000, seed: int = 0, batch_size: int = 500,
                   stitch=None, fractions=None, stitch_mode: str = "timestep", **options) -> dict:
    """Sample ``num`` images from ``workdir`` (or, with ``stitch``, from smaller models' workdirs
    stitched before it, T-Stitch) into an .npz with ``images`` uint8 NHWC and ``labels``, plus a PNG grid."""
    if stitch:
        from jdistill.recipes import stitch as stitch_lib

        if options.get("stochastic"):
            raise ValueError("--stochastic is not available for stitched sampling")
        cfg_steps = options.get("steps") or 64
        sampler = stitch_lib.make_sampler(workdir, stitch, fractions or [], steps=int(cfg_steps),
                                          solver=options.get("solver") or "ddim",
                                          guidance_scale=options.get("guidance_scale") or 1.5, mode=stitch_mode)
    else:
        sampler = recipe_of(workdir).make_sampler(workdir, **options)
    images, labels, seconds = sampler.run(num, seed=seed, batch_size=batch_size, progress=True)
    out = out or os.path.join(workdir, "samples.npz")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(out, **arrays)
    png = images_lib.save_grid(os.path.splitext(out)[0] + ".png", images[:100], ncol=10)
    return {"npz": out, "png": png, "num": len(images), "seconds": seconds, "description": sampler.description}


def _load_images(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no samples file at {path}")
    with np.load(path) as f:
        if "images" not in f:
            raise ValueError(f"{path} has no 'images' array (it has {sorted(f.files)})")
        images = f["images"]
        labels = f["labels"] if "labels" in f else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images, labels


def evaluate_file(path: str, *, reference: str = "test", target: str | None = None) -> dict:
    """Digits: FD against the held-out (or train) set in the shipped classifier's features and the
    share of samples classified as their label. Paired tasks (``target``): mean PSNR / SSIM."""
    images, labels = _load_images(path)
    if target is not None:
        from jdistill.metrics.image import psnr, ssim

        ref, _ = _load_images(target)
        if ref.shape != images.shape:
            raise ValueError(f"prediction {images.shape} and target {ref.shape} differ in shape")
        return {"num": len(images), "psnr": float(np.mean(psnr(images, ref))),
                "ssim": float(np.mean(ssim(images, ref)))}
    if images.shape[1:] != (8, 8, 1):
        raise ValueError(f"the FD / accuracy metric is defined for 8x8x1 digits; {path} holds "
                         f"{images.shape[1:]} images (use --target for paired PSNR / SSIM)")
    from jdistill.metrics.classifier import digits_fd, load_digits_classifier

    out = {"num": len(images), "fd": float(digits_fd(images, reference=reference))}
    if labels is not None:
        clf = load_digits_classifier()
        out["class_accuracy"] = float(np.mean(clf.predict(images) == labels))
    return out
