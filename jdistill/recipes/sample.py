"""Sampling to files and scoring files: what `jdistill sample` and `jdistill eval` do.

``jdistill sample --workdir W`` works on every run the project writes (a teacher, any stage
of a distillation, the whole distillation): the run's recipe, read from its checkpoints,
makes the sampler.
"""

from __future__ import annotations

import os

import numpy as np

from jdistill import images as images_lib
from jdistill import files
from jdistill.errors import InvalidArgument, MissingInput, check_positive_int, check_seed
from jdistill.files import check_output_file
from jdistill.recipes import get_recipe, runs
from jdistill.recipes.evaluation import Sampler

DIGIT_CLASSES = 10


def make_sampler(workdir: str, *, stitch=None, fractions=None, stitch_mode: str | None = None, **options) -> Sampler:
    """The sampler of the run at ``workdir`` (or, with ``stitch``, smaller runs stitched before it)."""
    if stitch:
        from jdistill.recipes import stitch as stitch_lib

        given = [f"--{k}" for k in ("stochastic", "spacing", "timesteps", "condition") if options.get(k)]
        if given:
            raise InvalidArgument(f"{' / '.join(given)}: not available for stitched sampling")
        g = options.get("guidance_scale")
        return stitch_lib.make_sampler(workdir, stitch, fractions or [], steps=int(options.get("steps") or 64),
                                       solver=options.get("solver") or "ddim", guidance_scale=1.5 if g is None else g,
                                       mode=stitch_mode or "timestep")
    if fractions or stitch_mode:
        raise InvalidArgument(f"{'--fractions' if fractions else '--stitch-mode'} goes with --stitch")
    run = runs.open_run(workdir)
    recipe = get_recipe(run.recipe)
    if recipe.sampler is None:
        raise InvalidArgument(f"{workdir}: a {run.recipe!r} run has nothing to sample")
    return recipe.sampler(run, **options)


def sample_to_file(workdir: str, out: str | None = None, *, num: int | None = None, seed: int = 0,
                   batch_size: int = 500, **options) -> dict:
    """Sample ``num`` images (default 1000; with ``condition``, one per condition) from ``workdir`` into an
    .npz with ``images`` uint8 NHWC and ``labels`` (conditional models: ``condition``), plus a PNG grid."""
    if num is not None:
        check_positive_int("--num", num)
    check_positive_int("--batch-size", batch_size)
    check_seed(seed, "--seed")
    out = out or os.path.join(workdir, "samples.npz")
    check_output_file(out, ".npz")
    sampler = make_sampler(workdir, **options)
    if num is None:
        num = len(sampler.conditions["condition"]) if options.get("condition") else 1000
    images, labels, seconds = sampler.run(num, seed=seed, batch_size=batch_size, progress=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    if sampler.conditions:
        arrays.update(sampler.cycled(num))
    np.savez(out, **arrays)
    png = images_lib.save_grid(os.path.splitext(out)[0] + ".png", images[:100], ncol=10)
    return {"npz": out, "png": png, "num": len(images), "seconds": seconds, "description": sampler.description}


def _load_images(path: str, what: str = "samples file"):
    """(uint8 images (N, H, W, C), labels or None) of a samples .npz, each checked."""
    arrays = files.read_npz(path, what)
    if "images" not in arrays:
        raise InvalidArgument(f"{path} has no 'images' array (it has {sorted(arrays)})")
    images, labels = arrays["images"], arrays.get("labels")
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InvalidArgument(f"{path}: 'images' must be (N, H, W, C) with C = 1, 3 or 4, got shape {images.shape}")
    if images.dtype != np.uint8:
        hint = ""
        if np.issubdtype(images.dtype, np.floating):
            finite = images[np.isfinite(images)]
            span = f"values in [{finite.min():g}, {finite.max():g}]" if finite.size else "no finite values"
            hint = (f" ({span}{', NaN / inf' if finite.size < images.size else ''}; "
                    "jdistill.images.to_uint8 maps [-1, 1] floats to uint8)")
        raise InvalidArgument(f"{path}: 'images' must be uint8 in 0..255, got {images.dtype}{hint}")
    if len(images) == 0:
        raise InvalidArgument(f"{path}: 'images' holds no samples")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images):
            raise InvalidArgument(f"{path}: 'labels' must be one integer per image, shape ({len(images)},); got "
                                  f"shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InvalidArgument(f"{path}: 'labels' must be integers (class ids), got {labels.dtype}")
    return images, labels


def evaluate_file(path: str, *, reference: str = "test", target: str | None = None) -> dict:
    """Digits: FD against the held-out (or train) set in the shipped classifier's features and the
    share of samples classified as their label. Paired tasks (``target``): mean PSNR / SSIM."""
    if reference not in ("test", "train"):
        raise InvalidArgument(f"reference must be 'test' or 'train', got {reference!r}")
    images, labels = _load_images(path)
    if target is not None:
        from jdistill.metrics.image import psnr, ssim

        ref, _ = _load_images(target, "target file")
        if ref.shape != images.shape:
            raise InvalidArgument(f"prediction {images.shape} and target {ref.shape} differ in shape")
        return {"num": len(images), "psnr": float(np.mean(psnr(images, ref))),
                "ssim": float(np.mean(ssim(images, ref)))}
    if images.shape[1:] != (8, 8, 1):
        raise InvalidArgument(f"the FD / accuracy metric is defined for 8x8x1 digits; {path} holds "
                              f"{images.shape[1:]} images (use --target for paired PSNR / SSIM)")
    from jdistill.metrics.classifier import digits_fd, load_digits_classifier

    if labels is not None and not (labels.min() >= 0 and labels.max() < DIGIT_CLASSES):
        raise InvalidArgument(f"{path}: digit 'labels' must be in 0..{DIGIT_CLASSES - 1}, got "
                              f"{labels.min()}..{labels.max()}")
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

    check_positive_int("--num", num)
    check_seed(seed, "--seed")
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

    if os.path.isdir(path):
        raise InvalidArgument(f"{path} is a directory; expected a sweep's results.json (e.g. {path}/results.json)")
    if not os.path.isfile(path):
        raise MissingInput(f"no results file at {path}")
    try:
        with open(path) as f:
            result = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{path} is not a results.json (not JSON: {e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise InvalidArgument(f"{path} is JSON but not a sweep's results (no list of 'rows')")
    return result


# diffusers' pipelines' own defaults (num_inference_steps, guidance_scale), used where a
# pipeline folder carries no published sampler
PIPELINE_DEFAULTS = {"sd": (50, 7.5), "sdxl": (50, 5.0), "sd3": (28, 7.0)}


def text_to_image_to_file(source: str, prompts, out: str, *, negative_prompt: str | None = None, num: int = 1,
                          steps: int | None = None, guidance_scale: float | None = None, solver: str | None = None,
                          seed: int = 0, height: int | None = None, width: int | None = None) -> dict:
    """Images for ``prompts`` (``num`` each) from ``source``: a preset name (sampled as its authors
    publish unless ``steps`` / ``guidance_scale`` / ``solver`` say otherwise), a diffusers pipeline
    folder or one ``jdistill convert`` wrote. ``out``: a .png (a grid, or the image when there is
    one) or an .npz (``images`` uint8 NHWC and ``prompts``, plus the grid as .png)."""
    import time

    from jdistill.convert import presets
    from jdistill.pipelines import TextToImage

    prompts = [p for p in prompts for _ in range(num)]
    if not prompts:
        raise InvalidArgument("text-to-image needs at least one --prompt")
    preset = presets.find(source) if not os.path.exists(source) else None
    if preset is None and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise MissingInput(f"{source} is neither a pipeline folder (no model_index.json) nor a preset (known: "
                           f"{', '.join(presets.PRESETS)}); a single-file checkpoint is converted first: "
                           "jdistill convert FILE OUT --config PIPELINE_FOLDER")
    t2i = TextToImage.from_preset(preset.name) if preset is not None else TextToImage.from_pretrained(source)
    published = preset.sampler if preset is not None else None
    if published is not None:
        default_steps, default_guidance = published.steps[0], published.guidance_scale
    else:
        default_steps, default_guidance = PIPELINE_DEFAULTS[t2i.family]
    steps = default_steps if steps is None else steps
    guidance_scale = default_guidance if guidance_scale is None else guidance_scale
    timesteps = None
    # a published timestep list (Hyper-SD's one step at 800) goes with its step count and scheduler
    if published is not None and published.timesteps is not None and steps == len(published.timesteps) \
            and solver is None:
        timesteps = list(published.timesteps)
    plan = t2i.plan(steps, solver, timesteps=timesteps)  # a refused scheduler option fails before any sampling
    # a stochastic sampler's published eta (TCD's gamma) goes with its scheduler
    eta = published.eta if published is not None and published.eta is not None and solver is None else 0.0
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    start = time.perf_counter()
    images = t2i(prompts, negative, num_steps=steps, guidance_scale=guidance_scale, solver=solver, seed=seed,
                 height=height, width=width, timesteps=timesteps, eta=eta)
    seconds = time.perf_counter() - start
    description = (f"{preset.name if preset else source}: {steps} step{'s' * (steps != 1)} of {plan.solver}, guidance {guidance_scale:g}"
                   + (f", timesteps {timesteps}" if timesteps else ""))
    if out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        np.savez(out, images=images, prompts=np.array(prompts))
        png = images_lib.save_grid(os.path.splitext(out)[0] + ".png", images, upscale=1)
    else:
        png = images_lib.save_grid(out, images, upscale=1)
    return {"npz": out if out.endswith(".npz") else None, "png": png, "num": len(images), "seconds": seconds,
            "description": description}
