"""Sampling to files and scoring files: what `jdistill sample` and `jdistill eval` do.

``jdistill sample --workdir W`` works on every run the project writes (a teacher, any stage
of a distillation, the whole distillation): the run's recipe, read from its checkpoints,
makes the sampler.
"""

from __future__ import annotations

import os

import numpy as np

from jdistill import images as images_lib
from jdistill.errors import InvalidArgument, MissingInput
from jdistill.recipes import get_recipe, runs
from jdistill.recipes.evaluation import Sampler


def make_sampler(workdir: str, *, stitch=None, fractions=None, stitch_mode: str = "timestep", **options) -> Sampler:
    """The sampler of the run at ``workdir`` (or, with ``stitch``, smaller runs stitched before it)."""
    if stitch:
        from jdistill.recipes import stitch as stitch_lib

        if options.get("stochastic"):
            raise InvalidArgument("--stochastic is not available for stitched sampling")
        return stitch_lib.make_sampler(workdir, stitch, fractions or [], steps=int(options.get("steps") or 64),
                                       solver=options.get("solver") or "ddim",
                                       guidance_scale=options.get("guidance_scale") or 1.5, mode=stitch_mode)
    if fractions:
        raise InvalidArgument("--fractions goes with --stitch")
    run = runs.open_run(workdir)
    recipe = get_recipe(run.recipe)
    if recipe.sampler is None:
        raise InvalidArgument(f"{workdir}: a {run.recipe!r} run has nothing to sample")
    return recipe.sampler(run, **options)


def sample_to_file(workdir: str, out: str | None = None, *, num: int | None = None, seed: int = 0,
                   batch_size: int = 500, **options) -> dict:
    """Sample ``num`` images (default 1000; with ``condition``, one per condition) from ``workdir`` into an
    .npz with ``images`` uint8 NHWC and ``labels`` (conditional models: ``condition``), plus a PNG grid."""
    sampler = make_sampler(workdir, **options)
    if num is None:
        num = len(sampler.conditions["condition"]) if options.get("condition") else 1000
    images, labels, seconds = sampler.run(num, seed=seed, batch_size=batch_size, progress=True)
    out = out or os.path.join(workdir, "samples.npz")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    if sampler.conditions:
        arrays.update(sampler.cycled(num))
    np.savez(out, **arrays)
    png = images_lib.save_grid(os.path.splitext(out)[0] + ".png", images[:100], ncol=10)
    return {"npz": out, "png": png, "num": len(images), "seconds": seconds, "description": sampler.description}


def _load_images(path: str):
    if not os.path.isfile(path):
        raise MissingInput(f"no samples file at {path}")
    with np.load(path) as f:
        if "images" not in f:
            raise InvalidArgument(f"{path} has no 'images' array (it has {sorted(f.files)})")
        images = f["images"]
        labels = f["labels"] if "labels" in f else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InvalidArgument(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images, labels


def evaluate_file(path: str, *, reference: str = "test", target: str | None = None) -> dict:
    """Digits: FD against the held-out (or train) set in the shipped classifier's features and the
    share of samples classified as their label. Paired tasks (``target``): mean PSNR / SSIM."""
    images, labels = _load_images(path)
    if target is not None:
        from jdistill.metrics.image import psnr, ssim

        ref, _ = _load_images(target)
        if ref.shape != images.shape:
            raise InvalidArgument(f"prediction {images.shape} and target {ref.shape} differ in shape")
        return {"num": len(images), "psnr": float(np.mean(psnr(images, ref))),
                "ssim": float(np.mean(ssim(images, ref)))}
    if images.shape[1:] != (8, 8, 1):
        raise InvalidArgument(f"the FD / accuracy metric is defined for 8x8x1 digits; {path} holds "
                              f"{images.shape[1:]} images (use --target for paired PSNR / SSIM)")
    from jdistill.metrics.classifier import digits_fd, load_digits_classifier

    out = {"num": len(images), "fd": float(digits_fd(images, reference=reference))}
    if labels is not None:
        clf = load_digits_classifier()
        out["class_accuracy"] = float(np.mean(clf.predict(images) == labels))
    return out


def evaluate_run(workdir: str, *, num: int = 1000, seed: int = 0, **options) -> dict:
    """Sample ``num`` images from the run at ``workdir`` and score them (digits: FD + class accuracy;
    conditional models: PSNR / SSIM against the ground truth, and on digits FD + the share classified
    as their source digit)."""
    from jdistill.recipes import evaluation

    sampler = make_sampler(workdir, **options)
    digits = tuple(sampler.image_shape) == (8, 8, 1)
    if sampler.targets is not None:  # a conditional model: scored against its conditions' ground truth
        images, _, seconds = sampler.run(num, seed=seed)
        targets, labels = sampler.cycled_targets(num)
        row = evaluation.evaluate(images, labels, targets, ("paired", "digits") if digits else ("paired",))
        return {"sampler": sampler.description, "num": num, **row, "s_per_1000": seconds * 1000.0 / num}
    if not digits:
        raise InvalidArgument(f"{workdir} samples {tuple(sampler.image_shape)} images; scoring a run is defined "
                              "for 8x8x1 digits (sample it to a file and use --target for paired tasks)")
    row, _ = evaluation.score(sampler, num, seed, repeats=1)
    return {"sampler": row["sampler"], "num": num, "fd": row["fd"], "class_accuracy": row["class_acc"],
            "s_per_1000": row["s_per_1000"]}


def read_results(path: str) -> dict:
    """A results.json a sweep wrote."""
    import json

    if not os.path.isfile(path):
        raise MissingInput(f"no results file at {path}")
    try:
        with open(path) as f:
            result = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{path} is not a results.json (not JSON: {e})") from None
    if not isinstance(result, dict) or "rows" not in result:
        raise InvalidArgument(f"{path} is JSON but not a sweep's results (no 'rows')")
    return result
