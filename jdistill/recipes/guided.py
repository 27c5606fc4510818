"""Guided distillation (Meng et al., CVPR 2023): stage 1, then progressive halvings.

    jdistill distill --config configs/digits_guided.py --workdir runs/digits_guided
    jdistill distill --config configs/sd15_guided.py --workdir runs/sd15_guided

Layout of the workdir (each stage an Orbax checkpoint directory of its own):

    stage1/checkpoints             the guidance-conditioned student (one pass = teacher with CFG)
    steps_032/checkpoints          the 32-step student, distilled from stage 1 as a 64-step teacher
    steps_016/checkpoints          ... each round from the previous one
    steps_001/checkpoints

A round is finished when its checkpoint reaches the round's step count; a
restarted run skips finished rounds and resumes the current one from its
latest checkpoint (params, optimizer, step, RNG, data position). Each round
starts from the previous student with a fresh optimizer (Salimans & Ho).

Two kinds of teacher (a :class:`Task` each): a class-conditional model trained by
jdistill (``teacher.workdir``: pixel or latent, DiT or UNet), or a text-to-image
pipeline (``teacher.pipeline``: SD 1.x / 2.x, a diffusers or converted folder),
whose student learns on VAE latents of captioned images with the frozen text
encoder's prompt embeddings.

Guidance: the student reads the guidance scale g (diffusers' convention) as
its ``guidance`` condition; Meng et al.'s w = g - 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import config as config_lib
from jdistill.convert.engine import graft, init_parts
from jdistill.denoiser import Denoiser
from jdistill.diffusion.timesteps import unit_grid
from jdistill.models import registry
from jdistill.objectives.denoising import labels_cond
from jdistill.objectives.guided import guided_loss
from jdistill.objectives.progressive import progressive_loss
from jdistill.recipes import common
from jdistill.recipes import teacher as teacher_lib
from jdistill.sampling import samplers
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop
from jdistill.train import state as state_lib
from jdistill.train import step as step_lib

GUIDANCE_MODULE = "guidance_embedder"
# what a stage's params depend on: resuming with other values is refused
IDENTITY_SECTIONS = ("teacher", "guidance", "stage")


def rounds(cfg) -> list[int]:
    """Student step counts of the progressive rounds: start, start / 2, ..., end."""
    n, out = int(cfg.progressive.start_steps), []
    while n >= int(cfg.progressive.end_steps):
        out.append(n)
        n //= 2
    return out


def stage_names(cfg) -> list[str]:
    return ["stage1"] + [f"steps_{n:03d}" for n in rounds(cfg)]


def round_steps(cfg, n: int) -> int:
    """Training steps of the round whose student takes ``n`` sampling steps."""
    per = dict(cfg.progressive.train_steps)
    return int(per.get(str(n), per.get("default")))


def resolve(path: str) -> str:
    """A config path as given, or relative to the repository (configs/...)."""
    if os.path.isfile(path):
        return path
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, path)


# ----------------------------------------------------------------------------------------------
# Tasks: where the teacher, the data and the conditioning come from


@dataclasses.dataclass
class Task:
    """What the stages need to know about the teacher's world."""

    teacher: Denoiser
    source: object  # a BatchSource of {"image": x (pixels or latents), ...}
    cond_fn: Callable  # batch -> the network's condition
    uncond_fn: Callable | None  # batch -> the teacher's unconditional condition (None: its null_cond)
    sample_cond: Callable[[int], dict | None]  # n -> the condition of n evaluation samples
    decode: Callable  # the sampler's output -> images in [-1, 1]
    num_classes: int | None = None


def class_task(cfg, with_data: bool = True) -> Task:
    """A class-conditional teacher trained by jdistill (``teacher.workdir``)."""
    den, _ = teacher_lib.load_denoiser(cfg.teacher.workdir, use_ema=True)
    k = registry.num_classes(den.module)
    source = None
    if with_data:
        source = common.make_source(cfg.data, "train", int(cfg.data.batch_size), int(cfg.seed),
                                    registry.image_shape(den.module), what="the teacher")
    return Task(den, source, labels_cond, None, lambda n: {"class_labels": common.class_labels_for(n, k)},
                lambda x: x, k)


def caption_records(data_cfg):
    """(uint8 images, captions) of a captioned image split: ``photo_patches`` photographs are
    captioned "a photo of <name>" (e.g. "a photo of astronaut")."""
    from jdistill.data import pipeline

    builder = pipeline.load_builder(data_cfg.name, data_cfg.get("data_dir"))
    source = builder.as_data_source("train")
    n = min(len(source), int(data_cfg.get("max_examples") or len(source)))
    images, captions = [], []
    for i in range(n):
        rec = source[i]
        images.append(np.asarray(rec["image"]))
        caption = rec.get("caption")
        if caption is None:
            photo = rec["photo"].decode() if isinstance(rec["photo"], bytes) else str(rec["photo"])
            caption = data_cfg.caption_template.format(photo=photo.replace("_", " "))
        captions.append(caption.decode() if isinstance(caption, bytes) else caption)
    return np.stack(images), captions


def text_task(cfg, with_data: bool = True) -> Task:
    """A text-to-image pipeline teacher (``teacher.pipeline``): latents of captioned images, encoded
    once by the frozen VAE (posterior mean) and text encoder; the unconditional input is the empty
    prompt, as the pipeline's own CFG uses."""
    from jdistill.pipelines.text_to_image import TextToImage
    from jdistill.recipes.stitch import resolve_source

    t2i = TextToImage.from_pretrained(resolve_source(cfg.teacher.pipeline, cfg.teacher.get("models_dir")),
                                      cache_dir=cfg.teacher.get("cache_dir") or None)
    den = t2i.denoiser()
    prompts = list(cfg.sample.prompts)
    table_prompts = list(prompts)
    source = None
    if with_data:
        from jdistill.data.pipeline import BatchSource

        images, captions = caption_records(cfg.data)
        size = int(cfg.data.resolution)
        pixels = jax.image.resize(jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
                                  (len(images), size, size, images.shape[-1]), "bilinear")
        encode = jax.jit(lambda x: t2i.vae.apply({"params": t2i.params["vae"]}, x, method="latents_from_images"))
        latents = np.concatenate([np.asarray(encode(pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
        unique = sorted(set(captions))
        table_prompts = unique + prompts
        ids = np.asarray([unique.index(c) for c in captions], np.int32)
        records = [{"image": latents[i], "caption": ids[i]} for i in range(len(ids))]
        source = BatchSource(records, global_batch_size=int(cfg.data.batch_size), seed=int(cfg.seed),
                             image_shape=latents.shape[1:], keys=("image", "caption"), name=f"{cfg.data.name} latents")
    cond, uncond = t2i.encode_prompt(table_prompts, None)
    table, null = cond["encoder_hidden_states"], uncond["encoder_hidden_states"][:1]
    offset = len(table_prompts) - len(prompts)

    def cond_fn(batch):
        return {"encoder_hidden_states": table[batch["caption"]]}

    def uncond_fn(batch):
        return {"encoder_hidden_states": jnp.broadcast_to(null, (batch["caption"].shape[0],) + null.shape[1:])}

    def sample_cond(n):
        return {"encoder_hidden_states": table[offset + np.arange(n) % len(prompts)]}

    return Task(den, source, cond_fn, uncond_fn, sample_cond, t2i.decode)


def make_task(cfg, with_data: bool = True) -> Task:
    if cfg.teacher.get("pipeline"):
        return text_task(cfg, with_data)
    if cfg.teacher.get("config"):
        teacher_lib.ensure_trained(resolve(cfg.teacher.config), cfg.teacher.workdir)
    return class_task(cfg, with_data)


def student_template(cfg, teacher: Denoiser) -> Denoiser:
    return teacher.replace(module=teacher.module.clone(guidance_embed=True), params=None)


# ----------------------------------------------------------------------------------------------
# Stages


@dataclasses.dataclass
class Stage:
    """One trainable stage: its loss, where it starts from, what it reads frozen."""

    name: str
    steps: int
    loss_fn: object
    init_params: object  # () -> params
    frozen: object
    optim: object


def stage_config(cfg, stage: Stage) -> dict:
    """What a stage's checkpoint records: the run's config and which stage it is."""
    d = config_lib.to_dict(cfg)
    d["stage"] = {"name": stage.name, "steps": stage.steps}
    if d.get("teacher", {}).get("workdir"):  # so the results table finds the teacher from any folder
        d["teacher"]["workdir"] = os.path.abspath(d["teacher"]["workdir"])
    return d


def setup_stage(cfg, stage: Stage, workdir: str | None, mesh):
    """(state, step_fn, checkpointer) of a stage, fresh or resumed."""
    tx, schedule = common.make_optimizer(stage.optim, stage.steps)

    def init():
        return state_lib.init_state(stage.init_params(), tx, jax.random.key(int(cfg.seed) + 7),
                                    ema=float(cfg.train.ema_decay) > 0)

    ckpt = None
    if workdir is not None:
        ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, stage.name, "checkpoints"),
                                     save_every=int(cfg.train.ckpt_every), keep=int(cfg.train.keep))
    state = common.start_or_resume(ckpt, init, mesh, stage_config(cfg, stage), sections=IDENTITY_SECTIONS,
                                   jit_init=False)
    step_fn = step_lib.make_train_step(stage.loss_fn, tx, mesh=mesh, state=state, frozen=stage.frozen,
                                       ema_decay=float(cfg.train.ema_decay) or None, lr_schedule=schedule)
    return state, step_fn, ckpt


def final_params(state):
    return state.ema_params if state.ema_params is not None else state.params


def stage1(cfg, teacher: Denoiser, student: Denoiser, cond_fn=labels_cond, uncond_fn=None) -> Stage:
    def init_params():
        args, kwargs = registry.example_inputs(student.module)
        fresh = init_parts(student.module, (GUIDANCE_MODULE,), jax.random.key(int(cfg.seed)), *args, **kwargs)
        return graft(teacher.params, fresh, new=(GUIDANCE_MODULE,))

    loss = guided_loss(student, teacher.replace(params=None), scale_range=tuple(cfg.guidance.scale_range),
                       cond_fn=cond_fn, uncond_fn=uncond_fn, weighting=cfg.stage1.weighting)
    return Stage("stage1", int(cfg.stage1.steps), loss, init_params, teacher.params, cfg.stage1.optim)


def halving(cfg, n: int, student: Denoiser, previous_params, cond_fn=labels_cond) -> Stage:
    loss = progressive_loss(student, student, num_steps=n, scale_range=tuple(cfg.guidance.scale_range),
                            cond_fn=cond_fn, weighting=cfg.progressive.weighting)
    return Stage(f"steps_{n:03d}", round_steps(cfg, n), loss, lambda: previous_params, previous_params,
                 cfg.progressive.optim)


def stages(cfg, task: Task):
    """Yield the stages in order; each halving is built from the finished previous stage's params,
    which the caller sends back in (``params = yield stage``)."""
    student = student_template(cfg, task.teacher)
    params = yield stage1(cfg, task.teacher, student, task.cond_fn, task.uncond_fn)
    for n in rounds(cfg):
        params = yield halving(cfg, n, student, params, task.cond_fn)


def train(cfg, workdir: str, *, progress: bool = True, mesh=None):
    """Stage 1, then every halving; returns {stage name: final params}."""
    mesh = mesh if mesh is not None else common.make_mesh(cfg)
    task = make_task(cfg)
    student = student_template(cfg, task.teacher)
    out = {}
    gen = stages(cfg, task)
    stage = next(gen)
    while True:
        state, step_fn, ckpt = setup_stage(cfg, stage, workdir, mesh)
        sample_fn = grid_sampler(cfg, task, student, stage.name) if cfg.train.sample_every else None
        state = loop.run(step_fn=step_fn, state=state, frozen=stage.frozen, batches=lambda k: task.source.iterate(k),
                         mesh=mesh, num_steps=stage.steps, workdir=os.path.join(workdir, stage.name),
                         checkpointer=ckpt, config=stage_config(cfg, stage), log_every=int(cfg.train.log_every),
                         sample_every=int(cfg.train.sample_every), desc=stage.name, progress=progress,
                         sample_fn=sample_fn)
        ckpt.close()
        if int(jax.device_get(state.step)) < stage.steps:  # preempted: stop here, resume later
            return out
        out[stage.name] = final_params(state)
        try:
            stage = gen.send(out[stage.name])
        except StopIteration:
            return out


def student_steps(stage_name: str) -> int | None:
    return int(stage_name.split("_")[1]) if stage_name.startswith("steps_") else None


def grid_sampler(cfg, task: Task, student: Denoiser, stage_name: str, num: int = 100):
    n = student_steps(stage_name) or int(cfg.sample.steps)
    grid = unit_grid(student.schedule, n)
    shape = (num, *registry.image_shape(student.module))
    noise = jax.random.normal(jax.random.key(1234), shape)
    cond = dict(task.sample_cond(num), guidance=np.full((num,), float(cfg.sample.guidance_scale), np.float32))

    def sample(state):
        den = student.replace(params=final_params(state))
        return task.decode(samplers.sample_jit(den, noise, cond, grid=grid, solver="ddim"))

    return sample


# ----------------------------------------------------------------------------------------------
# Trained students back


def read_stage_config(workdir: str, stage_name: str = "stage1"):
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, stage_name, "checkpoints"), read_only=True)
    return config_lib.from_dict(ck.read_config())


def load_student(workdir: str, stage_name: str, task: Task | None = None):
    """(student Denoiser with trained params, config) of a finished or running stage."""
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, stage_name, "checkpoints"), read_only=True)
    cfg = config_lib.from_dict(ck.read_config())
    task = task or make_task(cfg, with_data=False)
    student = student_template(cfg, task.teacher)
    steps = int(cfg.stage.steps)
    tx, _ = common.make_optimizer(cfg.stage1.optim if stage_name == "stage1" else cfg.progressive.optim, steps)

    def init():
        args, kwargs = registry.example_inputs(student.module)
        params = jax.eval_shape(lambda: student.module.init(jax.random.key(0), *args, **kwargs)["params"])
        return state_lib.init_state(params, tx, jax.random.key(0), ema=float(cfg.train.ema_decay) > 0)

    abstract = jax.eval_shape(init)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _, _ = ck.restore(ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: dev, abstract)))
    return student.replace(params=final_params(state)), cfg


def make_sampler(workdir: str, *, steps=None, solver=None, guidance_scale=None, stochastic=False, use_ema=True):
    """The distilled student for ``steps`` sampling steps: the round trained for that count, or the
    stage-1 student (a full-length sampler) when no round has it. DDIM, or with ``stochastic`` Meng
    et al.'s N-step stochastic sampler. One model call per step: guidance is an input, not CFG."""
    from jdistill.recipes.sample import Sampler

    cfg = read_stage_config(workdir)
    steps = int(steps or cfg.sample.steps)
    name = f"steps_{steps:03d}"
    if not os.path.isdir(os.path.join(workdir, name, "checkpoints")):
        name = "stage1"
    if solver not in (None, "ddim"):
        raise ValueError(f"a distilled student samples with ddim (or --stochastic), not {solver!r}")
    task = make_task(cfg, with_data=False)
    den, _ = load_student(workdir, name, task)
    g = float(cfg.sample.guidance_scale if guidance_scale is None else guidance_scale)
    mode = "stochastic" if stochastic else "ddim"
    grid = unit_grid(den.schedule, steps)

    def fn(noise, cond, key):
        n = noise.shape[0]
        full = dict(task.sample_cond(n) if task.num_classes is None else cond, guidance=jnp.full((n,), g))
        return task.decode(samplers.sample_jit(den, noise, full, grid=grid, solver=mode, rng=key))

    return Sampler(fn=fn, image_shape=registry.image_shape(den.module), num_classes=task.num_classes,
                   description=f"student ({name}) {mode} {steps} steps, g={g:g}")


TEACHER_STEPS = (1, 2, 4, 8, 16, 64)
STUDENT_STEPS = (1, 2, 4, 8)


def results_table(workdir: str, *, guidance_scales=(1.5, 2.0), num: int = 1000, out_dir: str | None = None,
                  teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, seed: int = 0,
                  progress: bool = True) -> dict:
    """FD, class accuracy and wall time per 1000 samples: the teacher with DDIM + CFG at
    ``teacher_steps`` and the distilled students at ``student_steps`` (DDIM and stochastic), for
    each guidance scale; and the paper's claims checked on these numbers."""
    from jdistill.recipes.demo import TIMING_REPEATS, score
    from jdistill.recipes.sample import retime_round_robin

    stage_cfg = config_lib.from_dict(ckpt_lib.Checkpointer(os.path.join(workdir, "stage1", "checkpoints"),
                                                           read_only=True).read_config())
    rows, timed = [], []

    def add(kind, steps, g, sampler, mode):
        row, images = score(sampler, num, seed, repeats=1)
        row.update(model=kind, steps=steps, guidance_scale=g, w=g - 1.0, mode=mode)
        rows.append(row)
        timed.append((row, sampler))
        if progress:
            print(f"{kind:8s} {mode:10s} {steps:3d} steps g={g:g}: FD {row['fd']:.2f} acc {row['class_acc']:.3f} "
                  f"{row['s_per_1000']:.3f} s/1000", flush=True)
        if out_dir and steps in (1, 4, 64):
            from jdistill import images as images_lib

            images_lib.save_grid(os.path.join(out_dir, f"{kind}_{mode}_{steps}steps_g{g:g}.png"), images[:100], ncol=10)

    for g in guidance_scales:
        for n in teacher_steps:
            add("teacher", n, g, teacher_lib.make_sampler(stage_cfg.teacher.workdir, steps=n, solver="ddim",
                                                          guidance_scale=g), "ddim+cfg")
        for n in student_steps:
            for stochastic in (False, True):
                if stochastic and n == 1:
                    continue  # one step has only the (deterministic) last step
                add("student", n, g, make_sampler(workdir, steps=n, guidance_scale=g, stochastic=stochastic),
                    "stochastic" if stochastic else "ddim")
    retime_round_robin(timed, num, repeats=TIMING_REPEATS, seed=seed)
    result = {"teacher": stage_cfg.teacher.workdir, "student": workdir, "num": num, "rows": rows,
              "device": f"{jax.devices()[0].platform} x{jax.device_count()}", "checks": claims(rows)}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(format_results(result) + "\n")
    return result


def _get(rows, model, steps, g, mode):
    return next(r for r in rows if r["model"] == model and r["steps"] == steps and r["guidance_scale"] == g
                and r["mode"] == mode)


def claims(rows) -> list[dict]:
    """The issue's targets, each with the numbers it was judged on."""
    out = []
    for g in sorted({r["guidance_scale"] for r in rows}):
        t64, t8, t4 = (_get(rows, "teacher", n, g, "ddim+cfg") for n in (64, 8, 4))
        s4, s1 = _get(rows, "student", 4, g, "ddim"), _get(rows, "student", 1, g, "ddim")
        out += [
            {"g": g, "claim": "4-step student FD within 15% of the teacher's 64-step FD",
             "value": s4["fd"] / t64["fd"], "target": "<= 1.15", "ok": s4["fd"] <= 1.15 * t64["fd"]},
            {"g": g, "claim": "4-step student FD below the teacher's 8-step DDIM FD",
             "value": s4["fd"] - t8["fd"], "target": "< 0", "ok": s4["fd"] < t8["fd"]},
            {"g": g, "claim": "1-step student FD below the teacher's 4-step DDIM FD",
             "value": s1["fd"] - t4["fd"], "target": "< 0", "ok": s1["fd"] < t4["fd"]},
            {"g": g, "claim": "4-step student at least 25x faster than the teacher's 64-step CFG sampling",
             "value": t64["s_per_1000"] / s4["s_per_1000"], "target": ">= 25",
             "ok": t64["s_per_1000"] >= 25 * s4["s_per_1000"]},
        ]
    return out


def format_results(result: dict) -> str:
    title = (f"Guided distillation on digits: {result['num']} samples per row, FD against the held-out split "
             f"({result['device']}; wall time: the best of 3 runs taken round-robin over all rows, "
             "compilation excluded)")
    lines = [title, "",
             "| model | sampler | steps | g (w = g - 1) | FD | class acc | s / 1000 samples |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['steps']} | {r['guidance_scale']:g} ({r['w']:g}) | "
                     f"{r['fd']:.2f} | {r['class_acc']:.3f} | {r['s_per_1000']:.3f} |")
    lines += ["", "| g | claim | value | target | met |", "|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['g']:g} | {c['claim']} | {c['value']:.3f} | {c['target']} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)
