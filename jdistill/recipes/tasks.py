"""Tasks: what is distilled. The teacher, the data it is distilled on, and how conditions are made.

* :func:`class_task`: a class-conditional teacher trained by jdistill (``teacher.workdir``);
* :func:`text_task`: a text-to-image pipeline (``teacher.pipeline``): VAE latents of captioned
  images, the frozen text encoder's prompt embeddings, the empty prompt as the unconditional
  input (as the pipeline's own CFG uses).

Loading a task never trains: a teacher workdir with no finished run is an error that
names it. (``jdistill distill`` trains a missing teacher first, when its config names one,
before it builds the task: see :func:`ensure_teacher`.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.denoiser import Denoiser
from jdistill.errors import InvalidArgument, MissingInput
from jdistill.models import registry
from jdistill.objectives.denoising import labels_cond
from jdistill.paths import resolve_model
from jdistill.recipes import common, runs
from jdistill.recipes import teacher as teacher_lib


@dataclasses.dataclass
class Task:
    teacher: Denoiser
    source: object  # a BatchSource of {"image": x (pixels or latents), ...}
    cond_fn: Callable  # batch -> the network's condition
    uncond_fn: Callable | None  # batch -> the teacher's unconditional condition (None: its null_cond)
    sample_cond: Callable[[int], dict | None]  # n -> the condition of n evaluation samples
    decode: Callable  # the sampler's output -> images in [-1, 1]
    num_classes: int | None = None


def repo_path(path: str) -> str:
    """A config path as given, or relative to the repository (configs/...)."""
    if os.path.isfile(path):
        return path
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, path)


def ensure_teacher(cfg, progress: bool = True) -> None:
    """Train the teacher workdir a distillation config names, when it also names the teacher's config."""
    if cfg.teacher.get("workdir") and cfg.teacher.get("config"):
        teacher_lib.ensure_trained(repo_path(cfg.teacher.config), cfg.teacher.workdir, progress=progress)


def from_teacher(teacher: Denoiser, source=None) -> Task:
    """A class-conditional task around a teacher Denoiser (labels -> ``class_labels``); an
    unconditional teacher (no class input: the photo prior) reads no condition."""
    k = teacher.num_classes
    if k is None:
        return Task(teacher, source, lambda batch: {}, None, lambda n: None, lambda x: x, None)
    return Task(teacher, source, labels_cond, None, lambda n: {"class_labels": common.class_labels_for(n, k)},
                lambda x: x, k)


def class_task(cfg, with_data: bool = True) -> Task:
    workdir = cfg.teacher.workdir
    if not runs.has_checkpoints(workdir):
        hint = (f"`jdistill train --config {cfg.teacher.config} --workdir {workdir}`" if cfg.teacher.get("config")
                else f"`jdistill train --config CONFIG --workdir {workdir}`")
        raise MissingInput(f"the teacher stage is missing: no checkpoint directory at {runs.checkpoint_dir(workdir)}; "
                           f"train the teacher first with {hint}")
    den, _ = teacher_lib.load_denoiser(workdir, use_ema=True)
    source = None
    if with_data:
        source = common.make_source(cfg.data, "train", int(cfg.data.batch_size), int(cfg.seed),
                                    registry.image_shape(den.module), what="the teacher")
    return from_teacher(den, source)


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


def text_task(cfg, with_data: bool = True, captions=None, record_fn: Callable | None = None) -> Task:
    """``captions``: the prompts a batch's ``caption`` ids index (synthetic data made from a prompt
    list); by default the data's own captions (``with_data``). ``record_fn(pixels)``: per-example
    arrays to add to the records, from the images in [-1, 1] at the data resolution (a conditional
    task's condition images)."""
    from jdistill.pipelines.text_to_image import TextToImage

    t2i = TextToImage.from_pretrained(resolve_model(cfg.teacher.pipeline, cfg.teacher.get("models_dir")),
                                      cache_dir=cfg.teacher.get("cache_dir") or None)
    den = with_model_fields(t2i.denoiser(), cfg, f"the pipeline {cfg.teacher.pipeline}")
    prompts = list(cfg.sample.prompts)
    table_prompts = list(captions or []) + prompts
    source = None
    if with_data:
        from jdistill.data.pipeline import BatchSource

        images, data_captions = caption_records(cfg.data)
        size = int(cfg.data.resolution)
        pixels = jax.image.resize(jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
                                  (len(images), size, size, images.shape[-1]), "bilinear")
        encode = jax.jit(lambda x: t2i.vae.apply({"params": t2i.params["vae"]}, x, method="latents_from_images"))
        latents = np.concatenate([np.asarray(encode(pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
        unique = sorted(set(data_captions))
        table_prompts = unique + prompts
        ids = np.asarray([unique.index(c) for c in data_captions], np.int32)
        extra = {k: np.asarray(v) for k, v in (record_fn(np.asarray(pixels)) if record_fn else {}).items()}
        records = [{"image": latents[i], "caption": ids[i], **{k: v[i] for k, v in extra.items()}}
                   for i in range(len(ids))]
        source = BatchSource(records, global_batch_size=int(cfg.data.batch_size), seed=int(cfg.seed),
                             image_shape=latents.shape[1:], keys=("image", "caption", *extra),
                             name=f"{cfg.data.name} latents")
    # every input the network reads (SD3: pooled_projections, SDXL: nested added_cond_kwargs), a row a prompt
    table, null = t2i.encode_prompt(table_prompts, None)
    offset = len(table_prompts) - len(prompts)

    def cond_fn(batch):
        return jax.tree.map(lambda v: v[batch["caption"]], table)

    def uncond_fn(batch):
        n = batch["caption"].shape[0]
        return jax.tree.map(lambda v: jnp.broadcast_to(v[:1], (n,) + v.shape[1:]), null)

    def sample_cond(n):
        return jax.tree.map(lambda v: v[offset + np.arange(n) % len(prompts)], table)

    return Task(den, source, cond_fn, uncond_fn, sample_cond, t2i.decode)


def make_task(cfg, with_data: bool = True, captions=None, record_fn: Callable | None = None) -> Task:
    """The task a config names; ``captions``: the prompt list of a text task's synthetic data;
    ``record_fn``: see :func:`text_task`."""
    if cfg.teacher.get("checkpoint"):
        raise InvalidArgument(f"teacher.checkpoint={cfg.teacher.checkpoint!r}: distilling a pretrained "
                              "class-conditional checkpoint on its own data set (ImageNet through the VAE) is planned "
                              "(`jdistill plan`) but not trained yet; train from a jdistill teacher run "
                              "(teacher.workdir) or a text-to-image pipeline (teacher.pipeline)")
    return text_task(cfg, with_data, captions, record_fn) if cfg.teacher.get("pipeline") else class_task(cfg, with_data)


def model_fields(cfg) -> dict:
    """The config's ``model`` section: options set on a pretrained network (``dtype``, ``param_dtype``
    and whatever else the module has, e.g. activation checkpointing), passed through as given."""
    return dict(cfg.get("model") or {})


def with_model_fields(den: Denoiser, cfg, where: str) -> Denoiser:
    """``den`` (a pretrained network) with the config's ``model`` section applied: the execution
    options (activation checkpointing, compute dtype) set on its module, every other field checked
    against the network's own value, since its weights fix its architecture (a plan's reduced depth
    is refused by name here rather than failing in the first forward pass)."""
    from jdistill.convert.dtypes import DTYPES

    fields = model_fields(cfg)
    module, wrong = den.module, []
    for key, value in fields.items():
        if not hasattr(module, key):
            wrong.append(f"model.{key}: {type(module).__name__} has no such field")
        elif key not in common.EXECUTION_FIELDS and getattr(module, key) != value:
            wrong.append(f"model.{key}={value!r} but {where} has {getattr(module, key)!r}")
    if wrong:
        raise InvalidArgument("; ".join(wrong) + ". A pretrained network's architecture comes from its weights: "
                              f"training sets only {', '.join(common.EXECUTION_FIELDS)} on it; drop the others or set them "
                              "to the network's values (they size `jdistill plan`'s compiles)")
    options = {k: DTYPES[v] if k == "dtype" and isinstance(v, str) else v
               for k, v in fields.items() if k in common.EXECUTION_FIELDS}
    return den.replace(module=module.clone(**options)) if options else den


def plan_task(cfg) -> Task:
    """The task with the teacher's params as ShapeDtypeStructs and no data: what ``jdistill plan``
    compiles. The teacher's network comes from its preset's published config
    (``teacher.checkpoint``, or ``teacher.pipeline``: :func:`plan_text_task`) or from the teacher
    run's config (``teacher.config``)."""
    from jdistill import config as config_lib
    from jdistill.convert.pretrained import published_module
    from jdistill.diffusion import schedules
    from jdistill.plan.steps import module_params

    if cfg.teacher.get("pipeline"):
        return plan_text_task(cfg)
    if cfg.teacher.get("checkpoint"):
        module = published_module(cfg.teacher.checkpoint, **model_fields(cfg))
        den = Denoiser.for_module(module, schedules.from_config(cfg.diffusion), cfg.diffusion.prediction)
    elif cfg.teacher.get("config"):
        den = teacher_lib.template(config_lib.load_config(repo_path(cfg.teacher.config)))
    else:
        raise InvalidArgument("a plan needs the teacher's network: set teacher.checkpoint (a preset) or "
                              "teacher.config (the teacher run's config)")
    return from_teacher(den.replace(params=module_params(den.module)))


def plan_text_task(cfg) -> Task:
    """A text-to-image task for ``jdistill plan``: the pipeline's network from its preset's published
    config (``model`` fields set on it), and the prompt embeddings carried by the batch as ``text``
    (the real task indexes a table of them by caption id: the same arrays per example). The
    unconditional input is one row broadcast, as the real task's empty prompt is."""
    from jdistill.plan.steps import preset_denoiser, sampling_cond

    # remat and compute dtype set as training sets them on the pipeline's network (params stay float32)
    architecture = {k: v for k, v in model_fields(cfg).items() if k not in common.EXECUTION_FIELDS}
    den = with_model_fields(preset_denoiser(cfg.teacher.pipeline, **architecture)[0], cfg, cfg.teacher.pipeline)

    def cond_fn(batch):
        return batch["text"]

    def uncond_fn(batch):
        return jax.tree.map(lambda v: jnp.broadcast_to(jnp.zeros((1,) + v.shape[1:], v.dtype), v.shape), batch["text"])

    def sample_cond(n):  # zeros from calloc: untouched pages cost nothing until a sampler reads them
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), sampling_cond(den.module, n))

    return Task(den, None, cond_fn, uncond_fn, sample_cond, lambda x: x)


def plan_batch(task: Task, batch_size: int, extra=None) -> dict:
    """One global batch of ``task`` as ShapeDtypeStructs: latents (and labels for a class task, the
    prompt embeddings as ``text`` for a text task), plus ``extra``."""
    from jdistill.plan.steps import image_batch, sampling_cond

    text = task.num_classes is None and task.uncond_fn is not None
    more = dict(extra or {})
    if text:
        more["text"] = sampling_cond(task.teacher.module, batch_size)
    return image_batch(batch_size, registry.image_shape(task.teacher.module), label=bool(task.num_classes),
                       extra=more)
