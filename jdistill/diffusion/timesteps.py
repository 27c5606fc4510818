"""Sampling time grids, spaced exactly as diffusers' schedulers space them.

A :class:`TimeGrid` lists, for each sampling step, the time the model is
called at (``t``) and the time the step lands on (``t_next``), both in the
schedule's native units, noisiest first. The last ``t_next`` is the clean
end. Solvers read nothing else, so any respacing works with any solver.
"""

from __future__ import annotations

import numpy as np
from flax import struct
import jax
import jax.numpy as jnp

from jdistill.diffusion.schedules import CosineVP, DiscreteVP, RectifiedFlow, shift_time

SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class TimeGrid:
    t: jax.Array
    t_next: jax.Array

    def __len__(self):
        return int(self.t.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


def spaced_timesteps(T: int, n: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps of DDPMScheduler / DDIMScheduler.set_timesteps, descending."""
    if n > T:
        raise ValueError(f"num_steps={n} exceeds the {T} training timesteps")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return ts.astype(np.int32)


def dpm_timesteps(T: int, n: int, spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """Integer timesteps of DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped = -inf)."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / n).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return ts.astype(np.int32)


def _grid(ts, ts_next, dtype):
    return TimeGrid(t=jnp.asarray(np.asarray(ts), dtype), t_next=jnp.asarray(np.asarray(ts_next), dtype))


def ddim_grid(T: int, n: int, spacing="leading", steps_offset=0, set_alpha_to_one=True) -> TimeGrid:
    """DDIMScheduler's pairs: every step lands ``T // n`` earlier (whatever the spacing),
    and a landing before 0 goes to the clean end (alpha_bar = 1), or to timestep 0
    when ``set_alpha_to_one`` is False (SD's scheduler config)."""
    ts = spaced_timesteps(T, n, spacing, steps_offset)
    nxt = ts - T // n
    nxt = np.where(nxt < 0, -1 if set_alpha_to_one else 0, nxt)
    return _grid(ts, nxt, jnp.int32)


def chain_grid(ts) -> TimeGrid:
    """Each step lands on the next listed timestep; the last on the clean end (-1).
    This is DDPMScheduler's and DPMSolverMultistepScheduler's rule."""
    ts = np.asarray(ts)
    return _grid(ts, np.concatenate([ts[1:], [-1]]), jnp.int32)


def unit_grid(schedule, n: int) -> TimeGrid:
    """n equal steps in unit time (1 -> 0) mapped to the schedule's units: the grid a
    progressively distilled N-step student was trained on, for any schedule."""
    u = np.linspace(1.0, 0.0, n + 1, dtype=np.float64)
    return TimeGrid(t=schedule.from_unit(jnp.asarray(u[:-1], jnp.float32)),
                    t_next=schedule.from_unit(jnp.asarray(u[1:], jnp.float32)))


def flow_grid(n: int, shift: float = 1.0, T: int = 1000) -> TimeGrid:
    """FlowMatchEulerDiscreteScheduler's sigmas (t = sigma), ending at 0.

    diffusers spaces n points between the shifted sigma_max and sigma_min of its
    training table and shifts them again; reproduced as is.
    """
    sigma_max = float(shift_time(np.float32(1.0), shift))
    sigma_min = float(shift_time(np.float32(1.0 / T), shift))
    sig = np.linspace(sigma_max * T, sigma_min * T, n).astype(np.float32) / T
    sig = shift_time(sig, shift).astype(np.float32)
    return _grid(sig, np.concatenate([sig[1:], np.zeros(1, np.float32)]), jnp.float32)


def make_grid(schedule, num_steps: int, solver: str = "ddim", spacing: str | None = None,
              steps_offset: int = 0, set_alpha_to_one: bool = True) -> TimeGrid:
    """The grid a diffusers user would get for this schedule and solver.

    Discrete schedules follow each diffusers scheduler's own rule (DDIM steps by
    T // n; DDPM and DPM-Solver chain their listed timesteps). Continuous
    schedules use equal steps in t (``unit_grid``), flow schedules diffusers' sigma list.
    """
    if isinstance(schedule, DiscreteVP):
        T = schedule.num_train_timesteps
        if solver in ("ddim", "stochastic"):
            return ddim_grid(T, num_steps, spacing or "leading", steps_offset, set_alpha_to_one)
        if solver == "ddpm":
            return chain_grid(spaced_timesteps(T, num_steps, spacing or "leading", steps_offset))
        if solver == "dpmpp_2m":
            return chain_grid(dpm_timesteps(T, num_steps, spacing or "linspace", steps_offset))
        raise ValueError(f"solver {solver!r} has no grid on a discrete VP schedule "
                         "(ddim, stochastic, ddpm or dpmpp_2m; euler is for flow schedules)")
    if isinstance(schedule, RectifiedFlow):
        return flow_grid(num_steps, schedule.shift, schedule.num_train_timesteps)
    if isinstance(schedule, CosineVP):
        return unit_grid(schedule, num_steps)
    raise TypeError(f"no time grid for schedule {type(schedule).__name__}")
