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
from typing import Callable

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
    # a conditional network (a CoDi run's fine-tuned model) reads the condition images its partner samples
    # for ("condition"), of this kind ("inpaint", "sr2", ...), beside fixed inputs for n rows (the prior's null class)
    condition_kind: str | None = None
    fixed_cond: Callable[[int], dict] | None = None

    def check_steps(self, steps: int, use: str) -> None:
        """A network distilled for N steps walks an N-step grid only: each of its steps spans 1 / N."""
        if self.steps is not None and int(steps) != self.steps:
            raise InvalidArgument(f"{self.name} was distilled for {self.steps} steps; {use} runs a grid of {steps} "
                                  f"(use a {steps}-step round, or the stage-1 student, which takes any count)")

    def cond(self, given: dict | None, n: int):
        """Its input for ``n`` rows whose sampler conditions are ``given`` (``class_labels`` and / or the
        ``condition`` images, as :func:`jdistill.sampling.generate.generate` passes them; None: none)."""
        given = given or {}
        if self.condition_kind is not None:
            if given.get("condition") is None:
                raise InvalidArgument(f"{self.name} is a conditional model ({self.condition_kind}): it needs the "
                                      "condition images of the samples it draws")
            c = {**(self.fixed_cond(n) if self.fixed_cond else {}), "condition": jnp.asarray(given["condition"])}
        else:
            if given.get("condition") is not None:
                raise InvalidArgument(f"{self.name} reads no condition images; the samples it was given answer some")
            c = {} if given.get("class_labels") is None else {"class_labels": given["class_labels"]}
        c.update({k: jnp.full((n,), v, jnp.float32) for k, v in self.extra_cond.items()})
        return c or None


def condition_kind(members, use: str) -> str | None:
    """The condition images ``members`` all read (None: class labels or nothing); a mix is refused."""
    kinds = {m.condition_kind for m in members}
    if len(kinds) > 1:
        said = ", ".join(f"{m.name}: {m.condition_kind or 'no condition images'}" for m in members)
        raise InvalidArgument(f"{use} mixes networks that read different conditions ({said})")
    return kinds.pop()


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
