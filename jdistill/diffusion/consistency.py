"""Consistency models on a diffusion schedule (LCM / CoDi): boundary scalings and the skip grid.

f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t), with t the integer timestep
0..999 and sigma_data = 0.5; LCM scales t by 10 so that c_skip ~ 1 only
very near t = 0.

Schedules in continuous time (cosine VP, rectified flow) read the scalings at the
timestep their network sees, ``schedule.model_time(t)`` (1000 t): the same numbers a
discrete schedule's integer timestep gives, so one consistency parameterisation serves
every schedule (a discrete schedule's model time is its timestep).

The skip grid (LCM's DDIM-solver grid): N teacher steps over the training range, each
step from a grid time back by one grid interval k = T // N. Discrete schedules use
diffusers' timesteps (arange(1, N + 1) * k - 1 = 19, 39, ..., 999 for N = 50), each
landing k earlier, the first on timestep 0 (the script clips -1 to 0); continuous ones
the unit times i / N landing on (i - 1) / N, the first on the clean end t = 0 (flow times
then take the schedule's shift, as its sampling grid does).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.schedules import DiscreteVP, RectifiedFlow, shift_time


def boundary_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) at integer timestep t."""
    st = timestep_scaling * jnp.asarray(t, jnp.float32)
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / jnp.sqrt(st**2 + sigma_data**2)
    return c_skip, c_out


def consistency_fn(z, x0, t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    shape = (-1,) + (1,) * (z.ndim - 1)
    return c_skip.reshape(shape) * z + c_out.reshape(shape) * x0


def scalings_at(schedule, t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) at native time ``t`` of ``schedule``: read at the network's timestep."""
    return boundary_scalings(schedule.model_time(t), sigma_data, timestep_scaling)


def consistency_output(schedule, z, x0, t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """f(z, t) = c_skip z + c_out x0 at native time ``t`` (per example (B,) or a scalar)."""
    return consistency_fn(z, x0, jnp.broadcast_to(schedule.model_time(t), z.shape[:1]), sigma_data,
                          timestep_scaling)


def discrete_skip_starts(T: int, n: int) -> np.ndarray:
    """The N skip-grid steps' start timesteps on T discrete ones, least noisy first: k - 1, 2k - 1,
    ..., nk - 1 with k = T // N (LCM's: 19, 39, ..., 999 for N = 50)."""
    if not 1 <= n <= T:
        raise ValueError(f"a skip grid of {n} steps on {T} timesteps")
    return np.arange(1, n + 1) * (T // n) - 1


def skip_grid(schedule, num_steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) native times of the N skip-grid steps, least noisy first (see the module docstring)."""
    n = int(num_steps)
    if isinstance(schedule, DiscreteVP):
        start = discrete_skip_starts(schedule.num_train_timesteps, n)
        k = schedule.num_train_timesteps // n
        return start.astype(np.int32), np.maximum(start - k, 0).astype(np.int32)
    if n < 1:
        raise ValueError(f"a skip grid needs at least one step, got {n}")
    u = np.arange(0, n + 1, dtype=np.float64) / n
    if isinstance(schedule, RectifiedFlow) and schedule.shift != 1.0:
        u = shift_time(u, schedule.shift)
    u = u.astype(np.float32)
    return u[1:], u[:-1]
