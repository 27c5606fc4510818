"""T-Stitch (Pan et al., 2024): small denoisers for the early, noisy steps, large ones for the rest.

Training-free. K denoisers ordered small to large share a noise process
and a sample space; fractions r_1..r_K (summing to 1) say how much of the
trajectory each one serves. Only z_t (and the solver's own state, e.g.
DPM-Solver's previous x0) passes from one to the next; each model keeps its
own parameterisation, time units and guidance scale.

Switching rules:
* "timestep" (the paper's): model k serves the steps whose *original* time,
  as a fraction of the schedule's span, lies in its band. With two models and
  fraction r, the small one serves t / T >= 1 - r. The rule reads the time,
  not the step counter, so it means the same thing for any sampler and any
  respacing.
* "step": model k serves a share of the step counter (the SD pipelines of
  the reference implementation switch this way).

The loop is split at the switch points: every segment is its own
``lax.scan`` with one model, so a step costs exactly one call of the model
that owns it (no running every model and selecting).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from flax import struct

from jdistill.denoiser import Denoiser
from jdistill.diffusion.schedules import DiscreteVP, RectifiedFlow
from jdistill.diffusion.timesteps import TimeGrid
from jdistill.sampling import samplers

MODES = ("timestep", "step")


def check_fractions(fractions) -> np.ndarray:
    r = np.asarray(fractions, np.float64)
    if r.ndim != 1 or len(r) < 1 or np.any(r < 0) or abs(r.sum() - 1.0) > 1e-6:
        raise ValueError(f"stitch fractions must be >= 0 and sum to 1, got {list(fractions)}")
    return r


def normalized_time(schedule, t) -> np.ndarray:
    """t / T in [0, 1): integer timesteps over the training count, continuous times as they are."""
    t = np.asarray(t, np.float64)
    if isinstance(schedule, DiscreteVP):
        return t / schedule.num_train_timesteps
    return t / float(schedule.t_max)


def segments(grid: TimeGrid, schedule, fractions, mode: str = "timestep") -> list[tuple[int, int]]:
    """[start, stop) grid-step ranges, one per model (small to large), contiguous and covering the grid."""
    r = check_fractions(fractions)
    n = grid.num_steps
    if mode == "timestep":
        u = normalized_time(schedule, jax.device_get(grid.t))
        # model k serves 1 - (r_1 + ... + r_k) <= u < 1 - (r_1 + ... + r_{k-1}); the largest model
        # also takes everything below, the smallest everything above
        cum = np.cumsum(r)
        lower = 1.0 - cum
        # a model with nothing before it in the order serves nothing, even at u = 1 exactly
        # (continuous grids start at t = 1, where "u >= 1 - 0" would hand it the first step)
        # the tolerance is float32's: grid times are float32 (0.7 is stored as 0.69999999), the bounds float64
        counts = [int(np.sum(u >= lo - 1e-6)) if c > 1e-12 else 0 for lo, c in zip(lower[:-1], cum[:-1])]
        bounds = [0] + counts + [n]
    elif mode == "step":
        # the reference's rule (NVlabs' TStitchSD: step i is the small model's while (i + 1) / n <= r):
        # floor(r n) steps, not Python's round (half to even)
        bounds = [0] + [int(np.floor(c * n + 1e-9)) for c in np.cumsum(r)[:-1]] + [n]
    else:
        raise ValueError(f"unknown stitch mode {mode!r}; expected one of {MODES}")
    bounds = np.maximum.accumulate(bounds)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@struct.dataclass
class RetimedSchedule:
    """A model trained with schedule ``own`` seen on the grid of ``ref``: the solver reads the
    reference process's (a, s); the network receives its own time for the same logSNR."""

    ref: object
    own: object

    def alpha_sigma(self, t):
        return self.ref.alpha_sigma(t)

    def variances(self, t):
        return self.ref.variances(t)

    def logsnr(self, t):
        return self.ref.logsnr(t)

    def model_time(self, t):
        return self.own.model_time(self.own.t_from_logsnr(self.ref.logsnr(t)))


def _same_schedule(a, b) -> bool:
    if type(a) is not type(b):
        return False
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def on_grid_of(denoiser: Denoiser, ref_schedule) -> Denoiser:
    """``denoiser`` re-expressed on ``ref_schedule``'s time axis (matched by logSNR)."""
    if _same_schedule(denoiser.schedule, ref_schedule):
        return denoiser
    if isinstance(ref_schedule, RectifiedFlow) != isinstance(denoiser.schedule, RectifiedFlow):
        raise ValueError("cannot stitch a rectified-flow model with a variance-preserving one: "
                         "their z_t differ in scale, not just in time units")
    return denoiser.replace(schedule=RetimedSchedule(ref_schedule, denoiser.schedule))


# solvers that call the network twice a step, but on a run's last step (to the clean end), where they
# take the first-order step alone (``sampling.steps.heun``)
TWO_CALL_SOLVERS = ("heun",)


def network_calls(solver: str, steps: int) -> int:
    """Network calls of a whole ``steps``-step run (CFG batches cond and uncond in one call)."""
    return 2 * steps - 1 if solver in TWO_CALL_SOLVERS and steps else steps


@dataclass(frozen=True)
class StitchPlan:
    segments: tuple[tuple[int, int], ...]
    solver: str = "ddim"

    def steps(self) -> list[int]:
        """Grid steps per denoiser."""
        return [b - a for a, b in self.segments]

    def calls(self) -> list[int]:
        """Model calls per denoiser: one a step (CFG batches cond and uncond in it); a two-call
        solver's two, but one on the run's last step."""
        steps = self.steps()
        if self.solver not in TWO_CALL_SOLVERS:
            return steps
        end = max(b for _, b in self.segments)
        return [2 * n - (1 if n and b == end else 0) for n, (_, b) in zip(steps, self.segments)]


def plan(grid: TimeGrid, schedule, fractions, mode: str = "timestep", start: int = 0,
         solver: str = "ddim") -> StitchPlan:
    return StitchPlan(from_step(segments(grid, schedule, fractions, mode), start), solver)


def from_step(segs, start: int) -> tuple[tuple[int, int], ...]:
    """The segments of a run that begins at grid step ``start`` (img2img-style refinement): the
    steps before it are served by no one."""
    return tuple((max(a, start), max(b, start)) for a, b in segs)


def _per_model(value, k: int, what: str) -> tuple:
    """One value for every model, or a list with one per model."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{len(value)} {what} for {k} denoisers")
        return tuple(value)
    return (value,) * k


def sample(denoisers, fractions, noise, cond=None, *, grid: TimeGrid, solver: str = "ddim", rng=None,
           mode: str = "timestep", guidance_scales=None, uncond=None, start: int = 0, **options):
    """Stitched sampling from ``noise``; ``denoisers`` small to large, grid in the units of the
    last (largest) one's schedule. ``start``: begin at grid step ``start`` with ``noise`` the z
    there (a refinement); the models keep the bands the whole grid gives them.

    Each model keeps its own conditioning: ``cond``, ``uncond`` and ``guidance_scales`` are
    either one value for all or a list with one per model (a distilled student reads the
    guidance scale as an input and takes no CFG: its scale is None, its cond carries it).
    """
    k = len(denoisers)
    if k != len(fractions):
        raise ValueError(f"{k} denoisers but {len(fractions)} fractions")
    ref = denoisers[-1].schedule
    if not 0 <= start < grid.num_steps:
        raise ValueError(f"start step {start} outside a grid of {grid.num_steps} steps")
    segs = from_step(segments(grid, ref, fractions, mode), start)
    dens = tuple(on_grid_of(d, ref) for d in denoisers)
    return _sample_segments(dens, noise, _per_model(cond, k, "conds"), grid, rng,
                            _per_model(guidance_scales, k, "guidance scales"), _per_model(uncond, k, "unconds"),
                            segs=segs, solver=solver, **options)


def _run_segments(denoisers, noise, conds, grid, rng, scales, unconds, *, segs, solver, eta=0.0, clip_x0=None,
                  ddpm_variance="fixed_small", options=()):
    state = samplers.init_state(noise)
    for den, cond, g, uncond, (a, b) in zip(denoisers, conds, scales, unconds, segs):
        state = samplers.run_steps(den, state, grid, a, b, rng=rng, solver=solver, cond=cond, guidance_scale=g,
                                   uncond=uncond, eta=eta, clip_x0=clip_x0, ddpm_variance=ddpm_variance,
                                   **dict(options))
    return state.z


_jit_segments = jax.jit(_run_segments, static_argnames=("segs", "solver", "eta", "clip_x0", "ddpm_variance",
                                                         "options"))


def _sample_segments(*args, segs, solver, eta=0.0, clip_x0=None, ddpm_variance="fixed_small", **options):
    """The jitted segments; further solver options (``samplers.solver_step``'s) travel as one
    static tuple."""
    return _jit_segments(*args, segs=segs, solver=solver, eta=eta, clip_x0=clip_x0, ddpm_variance=ddpm_variance,
                         options=tuple(sorted(options.items())))
