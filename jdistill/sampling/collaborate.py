"""Adaptive teacher-student collaboration (Starodubcev et al., CVPR 2024): the sampling pieces.

The student samples; an oracle scores each sample; the samples scoring below a threshold tau
are improved by the teacher, the rest kept. Three ways to improve one (:class:`Refinement`):

* ``"paper"``: the paper's re-noising O_sigma = sqrt(1 - sigma) O + sqrt(sigma) Z, then
  ``steps`` teacher steps from that noise level (the time whose alpha_bar is 1 - sigma) to the
  clean end, equally spaced in unit time. At sigma = 1, O_sigma is Z and the teacher runs its own
  grid (``make_grid``, or a pipeline's plan): refinement is then regeneration from Z, bit for bit,
  on every schedule.
* ``"img2img"``: diffusers' img2img ``strength`` (the released code's): the teacher's grid of
  ``steps`` (diffusers' ``num_inference_steps``), entered at step ``t_start = steps -
  min(int(steps * strength), steps)`` as ``get_timesteps`` picks it, the sample noised to that
  step's level as ``scheduler.add_noise`` does (a_t O + s_t Z, the grid's own sigma when it has
  one). :func:`nominal_steps` is the released code's ``int(T / sigma + 1)``, which makes about T
  steps run.
* ``"regenerate"``: the teacher from scratch, from Z.

Compute really drops: :func:`improve` gathers the selected rows, pads them to one of a few
bucket sizes (so a jitted teacher compiles once per bucket, not per count) and runs the teacher
on those rows only; padding repeats a selected row and is discarded. Everything is seeded: the
student from the batch key, Z and the teacher's own noise from streams folded into it
(:data:`RENOISE_STREAM`, :data:`TEACHER_STREAM`, beyond any step index a sampler folds in).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.schedules import DiscreteVP, RectifiedFlow
from jdistill.diffusion.solvers import levels_from_sigma
from jdistill.diffusion.timesteps import TimeGrid, make_grid
from jdistill.sampling import stitch

FORMS = ("paper", "img2img", "regenerate")
RENOISE_STREAM = 2**30 + 1  # fold_in(key, .): the re-noising Z (and regeneration's starting noise)
TEACHER_STREAM = 2**30 + 2  # fold_in(key, .): the teacher sampler's own noise (stochastic solvers)


def img2img_start(num_steps: int, strength: float) -> int:
    """The first grid step diffusers' img2img pipelines run (``get_timesteps``: SD and SDXL,
    without ``denoising_start``)."""
    init = min(int(num_steps * strength), num_steps)
    return max(num_steps - init, 0)


def nominal_steps(run_steps: int, strength: float) -> int:
    """The released code's ``num_inference_steps = int(T / sigma + 1)`` for about T steps run; at
    sigma = 1, where that would run T + 1, T (img2img at full strength runs its whole grid)."""
    return int(run_steps) if strength >= 1.0 else int(run_steps / strength + 1)


@dataclasses.dataclass(frozen=True)
class Refinement:
    """How the teacher improves a selected sample. ``steps``: paper form, the steps run from sigma;
    img2img, diffusers' num_inference_steps (of which the last int(steps * strength) run);
    regenerate, the steps from scratch. ``strength``: sigma in (0, 1] (unused by regenerate)."""

    form: str
    strength: float
    steps: int
    solver: str = "ddim"

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"unknown refinement form {self.form!r}; expected one of {FORMS}")
        if not (isinstance(self.steps, (int, np.integer)) and self.steps >= 1):
            raise ValueError(f"refinement steps must be an integer >= 1, got {self.steps!r}")
        if self.form != "regenerate" and not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"refinement strength sigma must be in (0, 1], got {self.strength}")
        if self.form == "img2img" and img2img_start(self.steps, self.strength) >= self.steps:
            raise ValueError(f"img2img with {self.steps} steps at strength {self.strength} runs no step "
                             f"(int({self.steps} x {self.strength}) = 0)")

    def describe(self) -> str:
        if self.form == "regenerate":
            return f"regenerate {self.solver} {self.steps} steps"
        return f"{self.form} sigma={self.strength:g} {self.solver} {self.steps} steps"


def alpha_bar_time(schedule, alpha_bar: float):
    """The time whose alpha_bar (VP) or logSNR-matched level (flow) is ``alpha_bar``; 1 - alpha_bar
    = 1 gives the schedule's noisiest time exactly."""
    if alpha_bar <= 0.0:
        return jnp.asarray(schedule.t_max, jnp.int32 if isinstance(schedule, DiscreteVP) else jnp.float32)
    if isinstance(schedule, DiscreteVP):
        # invert alpha_bar's own interpolation (log alpha_bar linear between integers; t = -1 is clean)
        table = jnp.concatenate([jnp.ones((1,), jnp.float32), schedule.alphas_cumprod])
        pos = jnp.arange(-1, schedule.num_train_timesteps, dtype=jnp.float32)
        return jnp.interp(-math.log(alpha_bar), -jnp.log(table), pos)
    t = schedule.t_from_logsnr(jnp.float32(math.log(alpha_bar) - math.log1p(-alpha_bar)))
    return jnp.clip(t, 0.0, schedule.t_max)


def _to_unit(schedule, t) -> float:
    if isinstance(schedule, DiscreteVP):
        return (float(t) + 1.0) / schedule.num_train_timesteps
    return float(t) / float(schedule.t_max)


def paper_grid(schedule, sigma: float, steps: int) -> TimeGrid:
    """``steps`` equal steps in unit time from the level alpha_bar = 1 - sigma (sigma < 1) to the
    clean end, the first exactly where the re-noised sample sits."""
    if not 0.0 < sigma < 1.0:
        raise ValueError(f"the paper form's own grid takes sigma in (0, 1), got {sigma}; at sigma = 1 the "
                         "teacher runs its own grid (teacher_grid)")
    u = np.linspace(_to_unit(schedule, alpha_bar_time(schedule, 1.0 - sigma)), 0.0, steps + 1, dtype=np.float64)
    t = schedule.from_unit(jnp.asarray(u, jnp.float32)).at[0].set(alpha_bar_time(schedule, 1.0 - sigma))
    return TimeGrid(t=t[:-1], t_next=t[1:])


def teacher_grid(schedule, refinement: Refinement, grid_fn=None) -> tuple[TimeGrid, int]:
    """(grid, first step run) of a refinement on the teacher's ``schedule``. ``grid_fn(steps)``: the
    teacher's own grid of a whole run (a pipeline's scheduler plan); default ``make_grid``. The paper
    form at sigma = 1 starts from the noise itself, so it runs the teacher's own grid: regeneration."""
    r = refinement
    if r.form == "paper" and float(r.strength) < 1.0:
        return paper_grid(schedule, float(r.strength), r.steps), 0
    grid = grid_fn(r.steps) if grid_fn is not None else make_grid(schedule, r.steps, r.solver)
    return grid, (img2img_start(r.steps, r.strength) if r.form == "img2img" else 0)


def noise_level(schedule, grid: TimeGrid, step: int):
    """(a, s) at grid step ``step``: the grid's own sigma when it has one, else the schedule's."""
    if grid.sigma is not None:
        return levels_from_sigma(schedule, grid.sigma[step])
    return schedule.alpha_sigma(grid.t[step])


def renoise(x, noise, schedule, refinement: Refinement, grid: TimeGrid, start: int):
    """The teacher's starting z for samples ``x`` and unit noise ``noise``."""
    r = refinement
    if r.form == "regenerate":
        return noise
    if r.form == "img2img":
        a, s = noise_level(schedule, grid, start)
        return a * x + s * noise
    sigma = float(r.strength)
    z = math.sqrt(1.0 - sigma) * x + math.sqrt(sigma) * noise
    if isinstance(schedule, RectifiedFlow):  # the same logSNR on the flow path: z / (a + s)
        z = z / (math.sqrt(1.0 - sigma) + math.sqrt(sigma))
    return z


def teacher_calls(plan: stitch.StitchPlan, passes) -> int:
    """Network evaluations of one refined sample: each model's steps times its passes (2 with CFG)."""
    return int(sum(c * p for c, p in zip(plan.calls(), passes)))


# ------------------------------------------------------------------------ selection


def bucket_sizes(batch: int, buckets: int) -> list[int]:
    """The padded sizes a selection of a batch may take: ``buckets`` equal multiples up to the batch."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    step = -(-batch // buckets)
    return sorted({min(step * i, batch) for i in range(1, buckets + 1)})


def bucket_for(count: int, batch: int, buckets: int) -> int:
    return next(b for b in bucket_sizes(batch, buckets) if b >= count)


def needs_scores(tau: float) -> bool:
    """tau = -inf selects nothing and +inf everything, whatever the scores: no oracle need run."""
    return bool(np.isfinite(tau))


def select(scores, tau: float, batch: int) -> np.ndarray:
    """Indices of the samples the teacher improves: score below tau (tau = -inf: none, +inf: all)."""
    if not needs_scores(tau):
        return np.arange(batch) if tau > 0 else np.zeros((0,), np.int64)
    return np.flatnonzero(np.asarray(scores) < tau)


def padded(idx: np.ndarray, size: int) -> np.ndarray:
    """``idx`` repeated at its first entry up to ``size`` rows (the padding's results are dropped)."""
    return np.concatenate([idx, np.full(size - len(idx), idx[0], idx.dtype)]).astype(np.int32)


@dataclasses.dataclass
class Selection:
    """What one batch's collaboration did: which rows the teacher improved and how many it ran."""

    selected: np.ndarray  # indices into the batch
    rows_run: int  # the padded bucket the teacher ran on (0 when nothing was selected)
    batch: int


def improve(x, scores, tau: float, run_teacher, *, buckets: int = 8):
    """Replace the rows of ``x`` scoring below ``tau`` by ``run_teacher(rows)`` ((padded indices) ->
    improved rows, as many as given); nothing runs when nothing is selected. ``scores`` may be None
    for an infinite tau. (x, Selection)."""
    batch = x.shape[0]
    idx = select(scores, tau, batch)
    if idx.size == 0:
        return x, Selection(idx, 0, batch)
    rows = padded(idx, bucket_for(len(idx), batch, buckets))
    better = run_teacher(rows)[: len(idx)]
    return jnp.asarray(x).at[jnp.asarray(idx)].set(better), Selection(idx, len(rows), batch)


def take(tree, rows):
    """Rows of every array in a condition tree (None stays None)."""
    return None if tree is None else jax.tree.map(lambda a: jnp.asarray(a)[jnp.asarray(rows)], tree)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher as refinement runs it: one denoiser, or a T-Stitch chain (small to large, with
    ``fractions``), each with its CFG scale (None: guidance is an input or absent)."""

    denoisers: tuple
    guidance_scales: tuple
    fractions: tuple = (1.0,)
    mode: str = "timestep"
    grid_fn: Callable[[int], TimeGrid] | None = None  # steps -> the grid of a whole run (default make_grid)

    @property
    def schedule(self):
        return self.denoisers[-1].schedule

    @property
    def passes(self) -> tuple[int, ...]:
        # the scales reach the jitted sampler traced: any scale, 1 too, runs the CFG pair
        return tuple(1 if g is None else 2 for g in self.guidance_scales)

    def plan(self, refinement: Refinement) -> tuple[TimeGrid, int, stitch.StitchPlan]:
        grid, start = teacher_grid(self.schedule, refinement, self.grid_fn)
        return grid, start, stitch.plan(grid, self.schedule, self.fractions, self.mode, start, refinement.solver)

    def run(self, z, conds, grid: TimeGrid, start: int, rng, solver: str, unconds=None, **options):
        """z at grid step ``start`` -> the clean end; ``conds`` (and ``unconds``, the CFG negatives
        where the denoisers have no null class): one per denoiser."""
        return stitch.sample(list(self.denoisers), list(self.fractions), z, list(conds), grid=grid, solver=solver,
                             rng=rng, mode=self.mode, guidance_scales=list(self.guidance_scales),
                             uncond=None if unconds is None else list(unconds), start=start, **options)


def refine_rows(teacher: Teacher, refinement: Refinement, x, key, conds_for, *, unconds_for=None,
                solver_options=None):
    """A ``run_teacher`` for :func:`improve`: the selected rows of the student's ``x`` re-noised
    with their own rows of Z (drawn for the whole batch from ``key``, so a sample's Z does not
    depend on which others are selected) and run through the teacher. ``conds_for(rows)`` (and
    ``unconds_for(rows)``) give the teacher's per-denoiser conditions of those rows."""
    grid, start, _ = teacher.plan(refinement)

    def run(rows):
        noise = jax.random.normal(jax.random.fold_in(key, RENOISE_STREAM), x.shape, jnp.float32)
        rng = jax.random.fold_in(key, TEACHER_STREAM)
        z = renoise(take(x, rows), take(noise, rows), teacher.schedule, refinement, grid, start)
        return teacher.run(z, conds_for(rows), grid, start, rng, refinement.solver,
                           None if unconds_for is None else unconds_for(rows), **(solver_options or {}))

    return run
