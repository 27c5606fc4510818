"""T-Stitch with public checkpoints (configs/stitch_*.py): DiT-S/2 -> DiT-XL/2 and BK-SDM-tiny -> SD1.5.

    jdistill sample --config configs/stitch_dit_s_xl.py --num 8 --out runs/stitch_dit/samples.npz

The ``stitch`` recipe is training-free: its configs name two pretrained networks (converted
on first use, ``jdistill.convert.load_pretrained``, found through ``$JDISTILL_MODELS``), the
fraction of the trajectory the small one takes and how to sample.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from jdistill import images as images_lib
from jdistill.config import ConfigError
from jdistill.denoiser import Denoiser
from jdistill.diffusion.timesteps import make_grid
from jdistill.paths import resolve_model
from jdistill.recipes import Recipe
from jdistill.recipes.members import Member
from jdistill.sampling import stitch


def _class_member(cfg, section, schedule) -> Member:
    from jdistill.convert.pretrained import load_pretrained

    loaded = load_pretrained(resolve_model(section.checkpoint, cfg.models_dir), cache_dir=cfg.get("cache_dir") or None)
    den = Denoiser.for_module(loaded.module, schedule, cfg.diffusion.prediction, loaded.params,
                              guided_channels=cfg.sample.get("guided_channels") or None)
    return Member(den, float(cfg.sample.guidance_scale), {}, os.path.basename(section.checkpoint))


def save_config_samples(cfg, out: str, *, num: int | None = None, seed: int = 0) -> dict:
    """`jdistill sample --config configs/stitch_*.py`: samples to ``out`` (.npz + PNG grid)."""
    start = time.perf_counter()
    images, cond, desc = run_config(cfg, num=num, seed=seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    key = "labels" if cfg.task == "class_to_image" else "prompts"
    np.savez(out, images=images, **{key: np.asarray(cond)})
    png = images_lib.save_grid(os.path.splitext(out)[0] + ".png", images[:64])
    return {"npz": out, "png": png, "num": len(images), "seconds": time.perf_counter() - start, "description": desc}


def run_config(cfg, *, num: int | None = None, seed: int = 0, fraction: float | None = None):
    """Samples of a pretrained-pair stitch config: (uint8 images NHWC, labels or prompts, description)."""
    from jdistill.diffusion import schedules as schedules_lib

    r = float(cfg.fraction if fraction is None else fraction)
    steps, solver, g = int(cfg.sample.steps), cfg.sample.solver, float(cfg.sample.guidance_scale)
    key_noise, key_steps = jax.random.split(jax.random.key(seed))
    if cfg.task == "class_to_image":
        from jdistill.convert.pretrained import load_pretrained

        schedule = schedules_lib.from_config(cfg.diffusion)
        members = [_class_member(cfg, cfg.small, schedule), _class_member(cfg, cfg.large, schedule)]
        labels = np.resize(np.asarray(cfg.sample.labels, np.int32), num or len(cfg.sample.labels))
        for m in members:
            k = m.denoiser.module.num_classes
            if labels.min() < 0 or labels.max() >= k:
                raise ConfigError(f"sample.labels {sorted(set(labels.tolist()))} outside the {k} classes of {m.name}")
        large = members[-1].denoiser.module
        noise = jax.random.normal(key_noise, (len(labels), large.input_size, large.input_size, large.in_channels))
        grid = make_grid(schedule, steps, solver)
        z = stitch.sample([m.denoiser for m in members], [r, 1 - r], noise, {"class_labels": labels}, grid=grid,
                          solver=solver, rng=key_steps, mode=cfg.mode, guidance_scales=[g, g])
        vae = load_pretrained(resolve_model(cfg.vae, cfg.models_dir), cache_dir=cfg.get("cache_dir") or None)
        images = vae.module.apply({"params": vae.params}, z, method="images_from_latents")
        return images_lib.to_uint8(images), labels, f"stitch {cfg.small.checkpoint} -> {cfg.large.checkpoint} r={r:g}"
    if cfg.task == "text_to_image":
        from jdistill.pipelines.text_to_image import TextToImage

        pipes = [TextToImage.from_pretrained(resolve_model(s.pipeline, cfg.models_dir), cache_dir=cfg.get("cache_dir") or None)
                 for s in (cfg.small, cfg.large)]
        prompts = list(np.resize(np.asarray(cfg.sample.prompts, object), num or len(cfg.sample.prompts)))
        negative = cfg.sample.get("negative_prompt") or None
        encoded = [p.encode_prompt(prompts, negative and [negative] * len(prompts)) for p in pipes]
        plan = pipes[-1].plan(steps, solver)
        h, w = pipes[-1].default_size() if not cfg.sample.get("size") else tuple(cfg.sample.size)
        f = pipes[-1].vae_scale_factor
        noise = jax.random.normal(key_noise, (len(prompts), h // f, w // f, pipes[-1].latent_channels)) * plan.noise_scale
        z = stitch.sample([p.denoiser() for p in pipes], [r, 1 - r], noise, [c for c, _ in encoded], grid=plan.grid,
                          solver=plan.solver, rng=key_steps, mode=cfg.mode, guidance_scales=[g, g],
                          uncond=[u for _, u in encoded], **plan.sample_options()) * plan.final_scale
        return (images_lib.to_uint8(pipes[-1].decode(z)), prompts,
                f"stitch {cfg.small.pipeline} -> {cfg.large.pipeline} r={r:g} ({cfg.mode} mode)")
    raise ConfigError(f"unknown stitch task {cfg.task!r}; expected class_to_image or text_to_image")


def _no_training(cfg, workdir, **kw):
    raise ConfigError("the stitch recipe is training-free: sample a pretrained pair with "
                      "`jdistill sample --config CONFIG`, or stitch trained runs with `jdistill sample --workdir LARGE "
                      "--stitch SMALL --fractions F`")


RECIPE = Recipe("stitch", "T-Stitch of two pretrained networks (training-free)", "", train=_no_training,
                sample_config=save_config_samples)
