"""T-Stitch experiments: stitched sampling from trained models, the speed / quality sweep over the
fraction, and picking a fraction for a time budget.

    jdistill sample --workdir runs/digits_teacher --stitch runs/digits_teacher_small --fractions 0.4
    jdistill stitch-sweep --small runs/digits_teacher_small --large runs/digits_teacher --steps 16 64
    jdistill stitch-pick runs/stitch/results.json --budget 0.7

Members are workdirs of any recipe: a teacher applies classifier-free guidance
(two passes per call, batched); a guidance-distilled student reads the scale as
an input (one pass). Only z_t passes between them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import images as images_lib
from jdistill.denoiser import Denoiser
from jdistill.diffusion.timesteps import make_grid
from jdistill.models import registry
from jdistill.recipes.sample import Sampler, recipe_of, retime_round_robin
from jdistill.sampling import stitch


@dataclasses.dataclass
class Member:
    """A stitched model with its own way of being guided."""

    denoiser: Denoiser
    guidance_scale: float | None  # CFG scale for teachers; None for students (guidance is an input)
    extra_cond: dict  # e.g. {"guidance": g} for a guidance-distilled student
    name: str

    def cond(self, labels, n):
        c = {} if labels is None else {"class_labels": labels}
        c.update({k: jnp.full((n,), v, jnp.float32) for k, v in self.extra_cond.items()})
        return c or None


def load_member(workdir: str, guidance_scale: float) -> Member:
    recipe = recipe_of(workdir)
    name = os.path.basename(os.path.normpath(workdir))
    if recipe.__name__.endswith("teacher"):
        den, _ = recipe.load_denoiser(workdir)
        k = registry.num_classes(den.module)
        return Member(den, guidance_scale if k else None, {}, name)
    if recipe.__name__.endswith("guided"):
        den, _ = recipe.load_student(workdir, "stage1")  # the stage-1 student serves any step count
        return Member(den, None, {"guidance": guidance_scale}, f"{name} (stage-1 student)")
    raise ValueError(f"{workdir}: a {recipe.__name__} run cannot be stitched")


def stitched_sampler(members: list[Member], fractions, *, steps: int, solver: str = "ddim",
                     mode: str = "timestep") -> Sampler:
    """A Sampler running ``members`` (small to large) with ``fractions`` of the trajectory each."""
    ref = members[-1].denoiser
    grid = make_grid(ref.schedule, steps, solver)
    dens = [m.denoiser for m in members]
    plan = stitch.plan(grid, ref.schedule, fractions, mode)
    k = registry.num_classes(ref.module)

    def fn(noise, cond, key):
        labels = None if cond is None else cond["class_labels"]
        conds = [m.cond(labels, noise.shape[0]) for m in members]
        return stitch.sample(dens, list(fractions), noise, conds, grid=grid, solver=solver, rng=key, mode=mode,
                             guidance_scales=[m.guidance_scale for m in members])

    frac = "/".join(f"{f:g}" for f in fractions)
    desc = f"stitch {'+'.join(m.name for m in members)} r={frac} {solver} {steps} steps"
    return Sampler(fn=fn, image_shape=registry.image_shape(ref.module), num_classes=k, description=desc, plan=plan)


def members_from(workdirs, guidance_scale):
    return [load_member(w, guidance_scale) for w in workdirs]


def make_sampler(large_workdir: str, small_workdirs, fractions, *, steps: int, solver: str = "ddim",
                 guidance_scale: float = 1.5, mode: str = "timestep") -> Sampler:
    """``fractions`` for the small models (in order); the large one serves the rest."""
    fractions = list(fractions)
    if len(fractions) != len(small_workdirs):
        raise ValueError(f"{len(small_workdirs)} small models but {len(fractions)} fractions")
    members = members_from(list(small_workdirs) + [large_workdir], guidance_scale)
    return stitched_sampler(members, fractions + [1.0 - sum(fractions)], steps=steps, solver=solver, mode=mode)


def sweep(small: str, large: str, *, steps_list=(16, 64), fractions=None, num: int = 1000, out_dir: str,
          guidance_scale: float = 1.5, solver: str = "ddim", seed: int = 0, batch_size: int = 500,
          progress: bool = True, repeats: int = 3) -> dict:
    """FD, class accuracy and wall time per 1000 samples for every (steps, fraction); table + plot."""
    from jdistill.metrics.classifier import digits_fd, load_digits_classifier

    fractions = [round(f, 4) for f in (fractions if fractions is not None else np.linspace(0, 1, 11))]
    members = members_from([small, large], guidance_scale)
    clf = load_digits_classifier()
    rows, samplers_ = [], []
    for steps in steps_list:
        for r in fractions:
            sampler = stitched_sampler(members, [r, 1.0 - r], steps=steps, solver=solver)
            images, labels, seconds = sampler.run(num, seed=seed, batch_size=batch_size)
            calls = sampler.plan.calls()
            row = {"steps": steps, "fraction": r, "small_calls": calls[0], "large_calls": calls[1],
                   "fd": float(digits_fd(images)), "class_acc": float((clf.predict(images) == labels).mean()),
                   "s_per_1000": seconds * 1000.0 / num}
            rows.append(row)
            samplers_.append(sampler)
            if progress:
                print(f"steps {steps:3d} r={r:.1f}: FD {row['fd']:.2f} acc {row['class_acc']:.3f} "
                      f"{row['s_per_1000']:.2f} s/1000", flush=True)
            if r in (0.0, 0.4, 1.0):
                images_lib.save_grid(os.path.join(out_dir, f"stitch_{steps}steps_r{r:.1f}.png"), images[:100], ncol=10)
    retime_round_robin(list(zip(rows, samplers_)), num, repeats=repeats, seed=seed, batch_size=batch_size)
    for row in rows:  # relative to the large model alone at the same step count
        base = next(b for b in rows if b["steps"] == row["steps"] and b["fraction"] == 0.0)
        row["fd_vs_large"] = row["fd"] / base["fd"]
        row["time_vs_large"] = row["s_per_1000"] / base["s_per_1000"]
    # The cost ratio that matters is the one inside the sampling loop, where a step is one
    # model call plus the same solver update for either model: the large model alone over the
    # small one alone. (A standalone call benchmark misleads here: it overstated it by 30%.)
    cost_ratio = {row["steps"]: base["s_per_1000"] / row["s_per_1000"]
                  for row in rows if row["fraction"] == 1.0
                  for base in rows if base["steps"] == row["steps"] and base["fraction"] == 0.0}
    result = {"small": small, "large": large, "guidance_scale": guidance_scale, "solver": solver, "num": num,
              "call_cost_ratio": cost_ratio,
              "device": f"{jax.devices()[0].platform} x{jax.device_count()}", "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(format_table(result) + "\n")
    plot(result, os.path.join(out_dir, "sweep.png"))
    return result


def format_table(result: dict) -> str:
    ratio = ", ".join(f"{v:.1f}x at {k} steps" for k, v in result["call_cost_ratio"].items())
    title = (f"T-Stitch sweep: {result['small']} -> {result['large']}, {result['solver']}, CFG g="
             f"{result['guidance_scale']:g}, {result['num']} samples ({result['device']}); large/small cost per "
             f"sampling step (fraction 0 vs 1): {ratio or 'n/a (fraction 1 not swept)'}")
    lines = [title, "",
             "Wall time: the best of 3 runs taken round-robin over all rows, compilation excluded.", "",
             "| steps | fraction | small calls | large calls | FD | FD / large | class acc | s / 1000 | time / large |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['fraction']:.1f} | {r['small_calls']} | {r['large_calls']} | {r['fd']:.2f} | "
                     f"{r['fd_vs_large']:.3f} | {r['class_acc']:.3f} | {r['s_per_1000']:.2f} | "
                     f"{r['time_vs_large']:.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for steps in sorted({r["steps"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["steps"] == steps]
        fr = [r["fraction"] for r in rows]
        ax_fd.plot(fr, [r["fd"] for r in rows], "o-", label=f"DDIM {steps}")
        ax_t.plot(fr, [r["s_per_1000"] for r in rows], "o-", label=f"DDIM {steps}")
    ax_fd.set(xlabel="fraction of steps on the small model", ylabel="FD (held-out digits)", title="quality")
    ax_t.set(xlabel="fraction of steps on the small model", ylabel="seconds per 1000 samples", title="wall time")
    for ax in (ax_fd, ax_t):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"T-Stitch on digits ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick(result: dict, *, budget: float | None = None, seconds: float | None = None, steps: int | None = None) -> dict:
    """The best-FD (steps, fraction) whose time fits: ``budget`` relative to the large model alone at
    the same step count, or ``seconds`` per 1000 samples. Raises if nothing fits."""
    if (budget is None) == (seconds is None):
        raise ValueError("give exactly one of budget (relative time) or seconds (per 1000 samples)")
    rows = [r for r in result["rows"] if steps is None or r["steps"] == steps]
    fits = [r for r in rows if (r["time_vs_large"] <= budget if budget is not None else r["s_per_1000"] <= seconds)]
    if not fits:
        fastest = min(rows, key=lambda r: r["s_per_1000"])
        raise ValueError(f"no configuration fits the budget; the fastest is {fastest['steps']} steps at "
                         f"fraction {fastest['fraction']:.1f}: {fastest['s_per_1000']:.2f} s / 1000 "
                         f"({fastest['time_vs_large']:.2f}x the large model)")
    return min(fits, key=lambda r: (r["fd"], r["s_per_1000"]))


# ----------------------------------------------------------------------------------------------
# Pretrained pairs from public checkpoints (configs/stitch_*.py): DiT-S/2 -> DiT-XL/2 and
# BK-SDM-tiny -> SD1.5. Members are converted on first use (jdistill.convert.load_pretrained).


def resolve_source(name: str, models_dir: str | None) -> str:
    """A checkpoint path as given, else under ``models_dir`` / $JDISTILL_MODELS (presets resolve there too)."""
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    root = models_dir or os.environ.get("JDISTILL_MODELS")
    if root and os.path.exists(os.path.join(os.path.expanduser(root), name)):
        return os.path.join(os.path.expanduser(root), name)
    return name  # a preset name, or a path whose absence load_pretrained reports


def _class_member(cfg, section, schedule) -> Member:
    from jdistill.convert.pretrained import load_pretrained
    from jdistill.denoiser import NullClass

    loaded = load_pretrained(resolve_source(section.checkpoint, cfg.models_dir), cache_dir=cfg.get("cache_dir") or None)
    module = loaded.module
    den = Denoiser(params=loaded.params, schedule=schedule, module=module, prediction=cfg.diffusion.prediction,
                   learned_variance=module.learned_sigma, null_cond=NullClass(module.num_classes),
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
                raise ValueError(f"sample.labels {sorted(set(labels.tolist()))} outside the {k} classes of {m.name}")
        large = members[-1].denoiser.module
        noise = jax.random.normal(key_noise, (len(labels), large.input_size, large.input_size, large.in_channels))
        grid = make_grid(schedule, steps, solver)
        z = stitch.sample([m.denoiser for m in members], [r, 1 - r], noise, {"class_labels": labels}, grid=grid,
                          solver=solver, rng=key_steps, mode=cfg.mode, guidance_scales=[g, g])
        vae = load_pretrained(resolve_source(cfg.vae, cfg.models_dir), cache_dir=cfg.get("cache_dir") or None)
        images = vae.module.apply({"params": vae.params}, z, method="images_from_latents")
        return images_lib.to_uint8(images), labels, f"stitch {cfg.small.checkpoint} -> {cfg.large.checkpoint} r={r:g}"
    if cfg.task == "text_to_image":
        from jdistill.pipelines.text_to_image import TextToImage

        pipes = [TextToImage.from_pretrained(resolve_source(s.pipeline, cfg.models_dir), cache_dir=cfg.get("cache_dir") or None)
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
    raise ValueError(f"unknown stitch task {cfg.task!r}; expected class_to_image or text_to_image")
