"""Adaptive teacher-student collaboration on trained runs: calibration, the collaborative sampler,
budget accounting.

    jdistill collab-calibrate --student runs/digits_guided/steps_001 --student-steps 1 --out calib.json
    jdistill collab-sweep --student runs/digits_guided/steps_001 --teacher runs/digits_teacher --out runs/collab
    jdistill collab-pick runs/collab/results.json --budget 10

The student is any run whose recipe samples it (``Recipe.sampler``: a guided / progressive,
consistency, LADD or CoDi student), sampled exactly as alone; the teacher is any run's
:class:`~jdistill.recipes.members.Member` (``Recipe.member``), or several stitched small to large
(a T-Stitch teacher). A CoDi student samples for condition images (inpainting, super-resolution);
its teacher is its run's fine-tuned conditional model (``runs/X/finetune``), which refines each
selected sample for that sample's own condition. tau is the k-th percentile of the oracle's scores of the student's samples
on a calibration set drawn with the *same* student settings (the reference calibrated at another
guidance scale); a :class:`Calibration` file records them and refuses other settings.
Text-to-image pairs (LCM-SDXL -> SDXL, SDXL-Turbo -> refiner) are configs:
``recipes/collab_t2i.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jdistill.errors import InvalidArgument
from jdistill.metrics import oracles
from jdistill.recipes import Recipe, collab_t2i, get_recipe, runs
from jdistill.recipes.collab_calibration import Calibration, CalibrationMismatch
from jdistill.recipes import members as members_lib
from jdistill.recipes.evaluation import Sampler
from jdistill.sampling import collaborate
from jdistill.sampling.generate import generate
from jdistill.sampling.stitch import network_calls

CALIBRATION_SEED = 1  # calibration samples are drawn apart from the evaluation seed (0)


@dataclasses.dataclass(frozen=True)
class Student:
    """A student run sampled as its recipe samples it, with its settings (what calibration records)."""

    sampler: Sampler
    settings: dict  # run, steps, guidance scale (None: unguided), sampler description
    evaluations: int  # network evaluations per sample
    steps: int
    # what calibration samples: the same sampler, or for a conditional student (CoDi) the same model on
    # the train split's conditions, so tau is not fitted on the conditions it is evaluated on
    calibration_sampler: Sampler | None = None

    @property
    def condition_kind(self) -> str | None:
        return self.sampler.condition_kind


def load_student(workdir: str, *, steps: int, guidance_scale: float) -> Student:
    run = runs.open_run(workdir)
    recipe = get_recipe(run.recipe)
    if recipe.sampler is None:
        raise InvalidArgument(f"{workdir}: a {run.recipe!r} run has nothing to sample as a student")
    # the teacher's guidance scale, given to a student only if it reads one (a LADD student samples unguided)
    scale = float(guidance_scale) if recipe.guided_sampling else None
    options = {} if scale is None else {"guidance_scale": scale}
    sampler = recipe.sampler(run, steps=steps, **options)
    settings = {"run": os.path.abspath(workdir), "steps": int(steps), "guidance_scale": scale,
                "sampler": sampler.description}
    calibration_sampler = sampler
    if sampler.conditions is not None:  # a CoDi model: it samples for condition images
        calibration_sampler = recipe.sampler(run, steps=steps, split="train", **options)
        settings["calibration_conditions"] = "train split"
    calls = network_calls(sampler.solver or "ddim", int(steps))
    return Student(sampler, settings, calls * sampler.model_calls_per_step, int(steps), calibration_sampler)


def check_pair(student: Student, members) -> None:
    """A teacher refines what the student drew: class-conditional with class-conditional, a conditional
    (CoDi) student with a model that reads the same kind of condition images (its run's fine-tuned model)."""
    kind = members_lib.condition_kind(members, "a collaboration's teacher")
    if kind != student.condition_kind:
        said = lambda k: f"{k} condition images" if k else "class labels (no condition images)"  # noqa: E731
        raise InvalidArgument(f"the student samples for {said(student.condition_kind)}, the teacher "
                              f"({', '.join(m.name for m in members)}) reads {said(kind)}"
                              + ("; a CoDi student's teacher is its run's 'finetune' stage" if student.condition_kind
                                 else ""))


def load_teacher(workdirs, *, guidance_scale: float, fractions=None) -> tuple[collaborate.Teacher, list]:
    """(Teacher, its members): one run, or runs small to large with the fractions of all but the last."""
    workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
    fractions = list(fractions or [])
    if len(fractions) != len(workdirs) - 1:
        raise InvalidArgument(f"{len(workdirs)} teacher runs need {len(workdirs) - 1} fractions (the smaller "
                              f"models'), got {len(fractions)}")
    members = [members_lib.load(w, guidance_scale) for w in workdirs]
    for m in members:  # a refinement's step count is the sweep's to choose
        if m.steps is not None:
            raise InvalidArgument(f"{m.name} was distilled for {m.steps} steps only; a collaboration's teacher "
                                  "runs the step counts the budgets call for (use a teacher or a stage-1 student)")
    teacher = collaborate.Teacher(tuple(m.denoiser for m in members), tuple(m.guidance_scale for m in members),
                                  tuple(fractions) + (1.0 - sum(fractions),))
    return teacher, members


# --------------------------------------------------------------------------- calibration


def calibration_settings(student: Student, oracle: oracles.Oracle, num: int, seed: int) -> dict:
    return {"student": student.settings, "oracle": oracle.provenance, "set_size": int(num), "seed": int(seed)}


def calibrate(student: Student, oracle: oracles.Oracle, *, num: int = 1000, seed: int = CALIBRATION_SEED,
              batch_size: int = 500) -> Calibration:
    """Score ``num`` student samples (class-balanced labels, or the calibration split's conditions; seed
    ``seed``) exactly as inference does."""
    sampler = student.calibration_sampler or student.sampler
    labels = sampler.labels(num)
    images, _ = generate(sampler.fn, sampler.image_shape, labels, num=num, batch_size=min(batch_size, num), seed=seed,
                         conditions=sampler.cycled(num))
    scores = oracle.score(images, labels)
    return Calibration(np.sort(scores), calibration_settings(student, oracle, num, seed))


# --------------------------------------------------------------------------- the sampler


@dataclasses.dataclass
class CollabPlan:
    """A collaborative sampler's budget: what one sample costs, and what the last run selected."""

    student_evaluations: int
    student_steps: int
    teacher_evaluations: int  # per improved sample
    teacher_steps: int
    selections: dict = dataclasses.field(default_factory=dict)  # batch key -> collaborate.Selection

    def budget(self) -> dict:
        """Averages over the last run: steps, network evaluations (a CFG step is two), the share
        improved, and the evaluations the padded buckets actually cost."""
        sel = list(self.selections.values())
        total = sum(s.batch for s in sel) or 1
        share = sum(len(s.selected) for s in sel) / total
        padded = sum(s.rows_run for s in sel) / total
        return {"refined_share": share, "avg_steps": self.student_steps + share * self.teacher_steps,
                "avg_evals": self.student_evaluations + share * self.teacher_evaluations,
                "padded_evals": self.student_evaluations + padded * self.teacher_evaluations}


def collab_sampler(student: Student, oracle: oracles.Oracle, teacher: collaborate.Teacher, members,
                   refinement: collaborate.Refinement, tau: float, *, buckets: int = 8,
                   description: str = "") -> Sampler:
    """The student, then the teacher on the samples the oracle scores below ``tau`` (with their own
    labels or condition images)."""
    check_pair(student, members)
    grid, start, plan = teacher.plan(refinement)
    budget = CollabPlan(student.evaluations, student.steps, collaborate.teacher_calls(plan, teacher.passes),
                        sum(plan.steps()))

    def fn(noise, cond, key):
        x = student.sampler.fn(noise, cond, key)
        # the oracle scores what the samples were drawn for: their labels, else (a conditional student)
        # the class it sees in them; it is never shown the conditions' ground truth
        labels = None if cond is None or "class_labels" not in cond else np.asarray(cond["class_labels"])
        scores = oracle.score(x, labels) if collaborate.needs_scores(tau) else None

        def conds_for(rows):
            return [m.cond(collaborate.take(cond, rows), len(rows)) for m in members]

        x, selection = collaborate.improve(x, scores, tau, collaborate.refine_rows(teacher, refinement, x, key, conds_for),
                                           buckets=buckets)
        budget.selections[bytes(np.asarray(jax.random.key_data(key)).tobytes())] = selection
        return x

    return Sampler(fn=fn, image_shape=student.sampler.image_shape, num_classes=None,
                   description=description or f"collab {refinement.describe()}",
                   plan=budget).with_conditions_of(student.sampler)


def _no_training(cfg, workdir, **kw):
    raise InvalidArgument("the collab recipe is training-free: sample a text-to-image pair with `jdistill sample "
                          "--config CONFIG`, or compose trained runs with `jdistill collab-sweep`")


def plan_steps(cfg) -> list:
    """For `jdistill plan` (a text-to-image pair config): one sampler step of the student and one of
    the teacher (with CFG unless its guidance is off), at ``sample.batch_size`` latents of the config's
    size; the ``model`` section's fields are set on both networks (e.g. a reduced depth)."""
    from jdistill.plan.steps import preset_sampler_call

    size = cfg.sample.get("size")
    out = []
    for role in ("student", "teacher"):
        section = cfg[role]
        den_size = int(size[0]) // 8 if size else None  # the SD VAEs' 8x
        out.append(preset_sampler_call(section.pipeline, int(cfg.sample.batch_size),
                                       guidance_scale=float(section.guidance_scale) or None, size=den_size,
                                       name=f"{role} step", fields=dict(cfg.get("model") or {})))
    return out


__all__ = ["Calibration", "CalibrationMismatch", "CollabPlan", "Student", "calibrate", "collab_sampler",
           "load_student", "load_teacher"]

RECIPE = Recipe("collab", "adaptive teacher-student collaboration (training-free)", "", train=_no_training,
                sample_config=collab_t2i.save_config_samples, plan=plan_steps)
