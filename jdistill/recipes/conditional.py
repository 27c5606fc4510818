"""Conditional tasks: a diffusion prior, a condition derived from its data, and an adapted network.

A :class:`ConditionalTask` is what CoDi and its baselines share: the prior (a teacher workdir used
unconditionally, its class input the null class; or a text-to-image pipeline, whose prompts stay),
the condition kind (``data.conditions``: ``sr2``, ``sr4``, ``inpaint``, ``edges``), the training
batches with their ``condition``, the conditional network (the prior's backbone with an adapter,
``models.adapters``) and the evaluation set: the held-out split with fixed conditions.

Config sections read here: ``teacher`` (``workdir`` / ``config``, or ``pipeline``), ``data``,
``condition`` (``kind``), ``adapter`` (``kind``: "gated" / "controlnet", ``width``,
``copy_depth``, ``conditioning_embedding_out_channels`` for SD ControlNets).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.data import conditions
from jdistill.denoiser import Denoiser
from jdistill.errors import InvalidArgument
from jdistill.models import adapters, registry
from jdistill.recipes import tasks


@dataclasses.dataclass
class ConditionalTask:
    prior: tasks.Task  # the teacher and its data (its cond_fn: the prior's own inputs)
    spec: conditions.ConditionSpec
    model: Denoiser  # the adapted network, params None
    source: object  # batches with "image" and "condition"
    prior_cond_fn: Callable  # batch -> the prior's input (null class / the prompt)
    prior_uncond_fn: Callable | None  # batch -> the prior's unconditional input (text: the empty prompt)
    backbone_params: object = None  # the backbone's initial params (the prior's, plus a guidance input)

    @property
    def teacher(self) -> Denoiser:
        return self.prior.teacher

    def cond_fn(self, batch) -> dict:
        """The adapted network's input: the prior's, plus the condition image."""
        return {**self.prior_cond_fn(batch), "condition": batch["condition"]}

    def uncond_fn(self, batch) -> dict | None:
        if self.prior_uncond_fn is None:
            return None
        return {**self.prior_uncond_fn(batch), "condition": batch["condition"]}

    def init_params(self, seed: int, backbone_params=None):
        """The adapted network from the prior's params (or ``backbone_params``: a distilled student's)."""
        start = backbone_params if backbone_params is not None else self.backbone_params
        return adapters.init_adapted(self.model.module, self.teacher.params if start is None else start,
                                     jax.random.key(seed))


def _null_labels(teacher: Denoiser) -> Callable:
    def cond(batch):
        n = batch["image"].shape[0]
        return {"class_labels": jnp.full((n,), teacher.null_cond.null_id, jnp.int32)}
    return cond


def adapted_module(cfg, backbone, spec: conditions.ConditionSpec, image_channels: int, condition_size=None):
    a = cfg.adapter
    controlnet = None
    if a.kind == "controlnet" and type(backbone).__name__ == "UNet2DConditionModel":
        controlnet = adapters.controlnet_from_unet(backbone, spec.channels(image_channels),
                                                   tuple(a.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)))
    adapter = adapters.make_adapter(a.kind, backbone, width=int(a.get("width", 32)),
                                    copy_depth=a.get("copy_depth") or None, controlnet=controlnet)
    return adapters.Adapted(backbone, adapter, spec.channels(image_channels), condition_size)


def make_task(cfg, with_data: bool = True) -> ConditionalTask:
    spec = conditions.parse(cfg.condition.kind)
    if cfg.teacher.get("pipeline"):
        return _text_task(cfg, spec, with_data)
    prior = tasks.class_task(cfg, with_data)
    teacher = prior.teacher
    shape = registry.image_shape(teacher.module)
    module = adapted_module(cfg, teacher.module, spec, shape[-1])
    model = Denoiser.for_module(module, teacher.schedule, teacher.prediction)
    prior_cond = _null_labels(teacher) if teacher.num_classes else (lambda batch: {})
    source = conditions.ConditionalSource(prior.source, spec, int(cfg.seed)) if with_data else None
    return ConditionalTask(prior, spec, model, source, prior_cond, None)


def _text_task(cfg, spec, with_data: bool) -> ConditionalTask:
    """An SD pipeline as the prior: latents and prompts as in ``tasks.text_task``; the condition made
    from the pixels at the data resolution (fixed per example), read by a ControlNet in pixel space.
    With ``codi.scale_range`` the backbone reads the guidance scale (LCM's w embedding, zero at init)."""
    rng = np.random.default_rng([int(cfg.seed), 0xC0D1])
    prior = tasks.make_task(cfg, with_data, record_fn=lambda pixels: {"condition": conditions.make(spec, pixels, rng)})
    return _adapt_text_prior(cfg, spec, prior, lambda init: init())


def _adapt_text_prior(cfg, spec, prior: tasks.Task, evaluate: Callable) -> ConditionalTask:
    """The conditional task around a text prior; ``evaluate(init)`` makes the backbone's initial params
    (the real task runs ``init``, a plan traces it abstractly)."""
    from jdistill.recipes import consistency

    teacher = prior.teacher
    guided = bool(cfg.codi.get("scale_range"))
    backbone = consistency.student_template(teacher, guided)
    module = adapted_module(cfg, backbone.module, spec, 3, condition_size=int(cfg.data.resolution))
    model = Denoiser.for_module(module, teacher.schedule, teacher.prediction)
    start = evaluate(lambda: consistency.init_student(teacher, int(cfg.seed), guided)) if guided else None
    return ConditionalTask(prior, spec, model, prior.source, prior.cond_fn, prior.uncond_fn, start)


def plan_task(cfg) -> ConditionalTask:
    """The conditional task for ``jdistill plan`` (a text prior: ``tasks.plan_text_task``); batches
    carry ``condition`` (see :func:`plan_batch`)."""
    from jdistill.plan.steps import abstract_value

    if not cfg.teacher.get("pipeline"):
        raise InvalidArgument("planning CoDi is supported for a text-to-image prior (teacher.pipeline)")
    return _adapt_text_prior(cfg, conditions.parse(cfg.condition.kind), tasks.plan_text_task(cfg), abstract_value)


def plan_batch(cfg, task: ConditionalTask) -> dict:
    """A global batch: latents, prompt embeddings and the condition image in pixel space (the data
    resolution, the adapter's channels)."""
    r = int(cfg.data.resolution)
    condition = jax.ShapeDtypeStruct((int(cfg.data.batch_size), r, r, task.spec.channels(3)), jnp.float32)
    return tasks.plan_batch(task.prior, cfg.data.batch_size, extra={"condition": condition})


@dataclasses.dataclass
class EvaluationSet:
    images: np.ndarray  # uint8 ground truth (N, H, W, C)
    conditions: np.ndarray  # model-side conditions, float (N, H, W, channels)
    labels: np.ndarray | None  # digits: the class of each ground truth


def evaluation_set(cfg, spec: conditions.ConditionSpec, split: str = "test", seed: int = 0) -> EvaluationSet:
    """The held-out split of the prior's dataset with fixed conditions (inpainting halves from ``seed``)."""
    from jdistill.data import pipeline

    builder = pipeline.load_builder(cfg.data.name, cfg.data.get("data_dir"))
    source = builder.as_data_source(split)
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int32) if "label" in records[0] else None
    size = cfg.data.get("resolution")
    if size and int(size) != images.shape[1]:  # a latent model's pixels, as tasks.text_task resizes them
        resized = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), int(size), int(size), 3), "bilinear")
        images = np.asarray(jnp.clip(jnp.round(resized), 0, 255)).astype(np.uint8)
    floats = images.astype(np.float32) / 127.5 - 1.0
    return EvaluationSet(images, conditions.evaluation_set(spec, floats, seed), labels)
