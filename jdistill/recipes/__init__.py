"""Recipes: what the commands run, one module per method, each described by a :class:`Recipe`.

A config names its recipe (``recipe = "guided"``); a workdir's checkpoints store it, so every
command can find the code for any run. The layers below a recipe module:

* ``tasks``: what is distilled (a class-conditional workdir, a text-to-image pipeline);
* ``stages``: one training run = one checkpoint directory; resumable sequences of them;
* ``runs``: what a workdir holds, read from its checkpoints (never trains);
* ``evaluation``: samplers, the evaluator registry, fair wall times, reports;
* ``members``: a trained network as composite samplers (T-Stitch, collaboration) use it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from jdistill.errors import UserError


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    command: str  # the command that trains it: "train", "distill", or "" (training-free)
    train: Callable | None = None  # (cfg, workdir, *, progress, mesh, allow_inexact_resume) -> ...
    sampler: Callable | None = None  # (run, **options) -> evaluation.Sampler
    member: Callable | None = None  # (run, guidance_scale) -> members.Member, for composite samplers
    sample_config: Callable | None = None  # (cfg, out, *, num, seed) -> dict: sampling straight from a config
    # (cfg) -> [jdistill.plan.steps.TrainStep | CallStep]: the jitted steps it runs, built without
    # weights or data, for `jdistill plan`
    plan: Callable | None = None
    # whether its sampler takes a guidance scale (False: a student that learnt guided samples and samples
    # unguided, as LADD's), so that a composite (collaboration) passes the teacher's scale only where it applies
    guided_sampling: bool = True


class UnknownRecipe(UserError, ValueError):
    pass


# name -> module defining RECIPE (imported on first use: recipes pull in heavy dependencies)
RECIPES = {
    "teacher": "jdistill.recipes.teacher",
    "guided": "jdistill.recipes.guided",
    "stitch": "jdistill.recipes.stitch_pretrained",
    "lcm": "jdistill.recipes.consistency",
    "codi": "jdistill.recipes.codi",
    "ladd": "jdistill.recipes.ladd",
    "collab": "jdistill.recipes.collab",
}


def get_recipe(cfg_or_name) -> Recipe:
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.get("recipe", "teacher")
    if name not in RECIPES:
        raise UnknownRecipe(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).RECIPE
