"""Planning a conversion: which models, of which family, with which config, from which tensors.

The second step of source -> plan -> convert -> cache. :func:`plan` looks at a
:class:`~jdistill.convert.sources.ModelSource` / :class:`~jdistill.convert.sources.PipelineSource`
and decides, before any weight is converted, every job: its family (its converter checked
to exist), its config (read from ``config.json``, given, or read off a bare file's keys
and shapes) and its tensors (the file as it is, or a view of a single-file checkpoint that
renames the original layout to the family's keys). A bare file is opened once, here, for
its header; the plan keeps it open for the conversion (close the plan, or use it as a
context manager).

Bare files:

* a config given (dict / config.json): the file is a state dict of that config's family
  (SDXL-Lightning's ``*_unet.safetensors``, Hyper-SD's UNet);
* a single-file Stable Diffusion 1.x / 2.x / SDXL / SDXL refiner / SD3 / SD3.5 checkpoint
  (:mod:`jdistill.convert.single_file`): one job per component found, configs from the
  tensor shapes or from a given pipeline folder; keys no component reads are listed in
  :attr:`Plan.unused`;
* the original DiT ``.pt`` (:func:`jdistill.convert.registry.detect_checkpoint`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from jdistill.errors import InvalidArgument
from jdistill.convert import registry, single_file
from jdistill.convert.io import PIPELINE_INDEX, LazyStateDict
from jdistill.convert.sources import ModelSource, PipelineSource

SINGLE = "model"  # the component name of a single converted model


@dataclass
class Job:
    """One model to convert."""

    name: str  # component name ("model" for a single model)
    rel: str  # folder inside the destination ("." for a single model)
    family: registry.Family
    config: dict
    source: ModelSource  # the files the tensors come from
    config_file: Path | None = None  # the config's own file, copied byte for byte (None: written from ``config``)
    # the tensors as the family's converter reads them, from the opened file (None: the file as it is)
    view: Callable[[Mapping], Mapping] | None = None
    notes: tuple[str, ...] = ()  # what the conversion did that a reader should know (e.g. a filled identity)

    @property
    def class_name(self) -> str:
        return self.source.class_name or self.config.get("_class_name") or next(
            iter(self.config.get("architectures") or ()), "")


@dataclass
class Plan:
    """Everything a conversion will do, decided before any weight is converted."""

    kind: str  # "model", "pipeline", "file" (a bare file of one model) or "single-file" (several)
    source: ModelSource | PipelineSource
    jobs: list[Job]
    copies: dict[str, Path] = field(default_factory=dict)  # folders copied as they are (scheduler, tokenizer)
    skipped: dict[str, str] = field(default_factory=dict)
    index: dict | None = None  # the model_index.json written with a pipeline (None: a single model)
    index_file: Path | None = None  # copied byte for byte when it is the source's own
    layout: str | None = None  # a single file's layout ("sd1", "sdxl", "sd3", ...)
    unused: list[str] = field(default_factory=list)  # keys of a single file no component reads
    notes: list[str] = field(default_factory=list)
    state: LazyStateDict | None = None  # a bare file, opened once for its header and kept for the conversion

    def tensors(self, job: Job):
        """A context manager giving ``job``'s tensors as its converter reads them."""
        if self.state is not None and job.source.weights == self.source.weights:
            return _Borrowed(job.view(self.state) if job.view else self.state)
        sd = job.source.open()
        return _Owned(sd, job.view(sd) if job.view else sd)

    def configs(self) -> dict[str, dict]:
        """Each job's config by component name (what presets are checked against)."""
        return {j.name: j.config for j in self.jobs}

    def close(self):
        if self.state is not None:
            self.state.close()
            self.state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        lines = [f"{self.kind} {getattr(self.source, 'path', '')}" + (f" ({self.layout})" if self.layout else "")]
        for j in self.jobs:
            lines.append(f"  {j.name:<16} {j.family.name:<10} {j.class_name}")
            lines += [f"    {n}" for n in j.notes]
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        if self.unused:
            lines.append(f"  {len(self.unused)} keys no component reads: {_grouped(self.unused)}")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


class _Borrowed:
    def __init__(self, mapping):
        self.mapping = mapping

    def __enter__(self):
        return self.mapping

    def __exit__(self, *exc):
        pass


class _Owned(_Borrowed):
    def __init__(self, state, mapping):
        super().__init__(mapping)
        self.state = state

    def __exit__(self, *exc):
        self.state.close()


def _grouped(keys: Sequence[str], depth: int = 2, limit: int = 8) -> str:
    """``["a.b.c", "a.b.d", "e"]`` -> "a.b.* (2), e": a short account of many keys."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        head = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        groups[head] = groups.get(head, 0) + 1
    items = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return ", ".join(items[:limit]) + (f", ... {len(items) - limit} more groups" if len(items) > limit else "")


def _job(name: str, rel: str, ms: ModelSource) -> Job:
    config = ms.config
    family = registry.family_for_config(config, where=os.fspath(ms.config_file or ms.path))
    family.load(what=f"{ms.path} ({ms.class_name or family.description})")
    return Job(name, rel, family, config, ms, config_file=ms.config_file)


def _bare_file(source: ModelSource, components: Sequence[str] | None) -> Plan:
    """A checkpoint file with no config.json beside it: opened once, recognised from its keys."""
    where = os.fspath(source.path)
    state = source.open()
    try:
        if source.config is not None:  # a diffusers-layout state dict described by a given config
            _only_model(source, components)
            return Plan("file", source, [_job(SINGLE, ".", source)], state=state)
        layout = single_file.detect(state.keys())
        if layout is not None:
            found = single_file.plan_components(state, layout, where=where, pipeline_config=source.pipeline_config,
                                                components=components)
            jobs = [Job(c.name, c.name, registry.get(c.family), c.config, source, config_file=c.config_file,
                        view=c.view, notes=c.notes) for c in found.components]
            for j in jobs:
                j.family.load(what=f"{where} ({j.name})")
            return Plan("single-file", source, jobs, copies=found.copies, skipped=found.skipped, index=found.index,
                        index_file=found.index_file, layout=found.layout, unused=found.unused, notes=found.notes,
                        state=state)
        if source.pipeline_config is not None:
            raise registry.UnsupportedModel(f"{where}: a pipeline folder was given as its config, but the file is no "
                                            "single-file Stable Diffusion / SD3 checkpoint")
        _only_model(source, components)
        family, config = registry.detect_checkpoint(state, where=where)
        family.load(what=f"{where} ({family.description})")
        return Plan("file", source, [Job(SINGLE, ".", family, config, source)], state=state)
    except BaseException:
        state.close()
        raise


def _only_model(source: ModelSource, components) -> None:
    if components and list(components) != [SINGLE]:
        raise InvalidArgument(f"{source.path} is a single model: there are no components to pick "
                         f"(asked for {list(components)})")


def plan(source: ModelSource | PipelineSource, components: Sequence[str] | None = None) -> Plan:
    """What converting ``source`` will do (``components``: the pipeline / single-file components
    to convert, default all), every family checked before any weight is converted."""
    if isinstance(source, ModelSource):
        if source.is_file:
            return _bare_file(source, components)
        _only_model(source, components)
        return Plan("model", source, [_job(SINGLE, ".", source)])

    wanted = list(components) if components else None
    if wanted:
        unknown = [c for c in wanted if c not in source.models]
        if unknown:
            why = {c: source.absent.get(c) or ("not a model: copied as it is" if c in source.folders else
                                               "not in model_index.json") for c in unknown}
            raise InvalidArgument(f"{source.path}: cannot convert {why}; model components: {sorted(source.models)}")
    out = Plan("pipeline", source, [], copies=dict(source.folders), index=source.index,
               index_file=source.path / PIPELINE_INDEX)
    unsupported = []
    for name, ms in source.models.items():
        if wanted is not None and name not in wanted:
            out.skipped[name] = "not selected"
            continue
        aux = registry.AUXILIARY_CLASSES.get(ms.class_name)
        if aux and wanted is None:
            out.skipped[name] = aux
            continue
        try:
            out.jobs.append(_job(name, name, ms))
        except registry.UnsupportedModel as e:
            unsupported.append(f"{name}: {e}")
    if unsupported:
        raise registry.UnsupportedModel(
            f"{source.path}: {len(unsupported)} component(s) cannot be converted:\n  " + "\n  ".join(unsupported)
            + f"\nconvert the others with components={[j.name for j in out.jobs]} (--component NAME)")
    for name, why in source.absent.items():
        if wanted is None:
            out.skipped[name] = why
    if not out.jobs:
        raise InvalidArgument(f"{source.path}: no model component to convert (models: {sorted(source.models)})")
    return out


__all__ = ["Plan", "Job", "plan", "SINGLE"]
