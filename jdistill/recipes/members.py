"""A trained network as composite samplers see it: its Denoiser and how it is guided.

T-Stitch and teacher-student collaboration mix networks that take guidance differently:
a teacher applies classifier-free guidance (two passes per call, batched), a
guidance-distilled student reads the scale as an input (one pass), an adversarially
distilled student takes none. Each recipe turns a run into a :class:`Member`
(``Recipe.member``), so composite samplers never ask which recipe made a network.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.errors import InvalidArgument


@dataclasses.dataclass
class Member:
    denoiser: Denoiser
    guidance_scale: float | None  # CFG scale (two passes); None when guidance is an input or absent
    extra_cond: dict  # e.g. {"guidance": g} for a guidance-distilled student
    name: str
    steps: int | None = None  # the one step count it was distilled for (a progressive round); None: any

    def check_steps(self, steps: int, use: str) -> None:
        """A network distilled for N steps walks an N-step grid only: each of its steps spans 1 / N."""
        if self.steps is not None and int(steps) != self.steps:
            raise InvalidArgument(f"{self.name} was distilled for {self.steps} steps; {use} runs a grid of {steps} "
                                  f"(use a {steps}-step round, or the stage-1 student, which takes any count)")

    def cond(self, labels, n):
        c = {} if labels is None else {"class_labels": labels}
        c.update({k: jnp.full((n,), v, jnp.float32) for k, v in self.extra_cond.items()})
        return c or None


def load(workdir: str, guidance_scale: float) -> Member:
    """The network of any run, by its recipe's ``member``."""
    from jdistill.recipes import get_recipe, runs

    run = runs.open_run(workdir)
    recipe = get_recipe(run.recipe)
    if recipe.member is None:
        raise InvalidArgument(f"{workdir}: a {run.recipe!r} run has no network to compose with others")
    return recipe.member(run, guidance_scale)


def run_name(run) -> str:
    return os.path.basename(os.path.normpath(run.workdir)) + (f"/{run.stage}" if run.stage else "")
