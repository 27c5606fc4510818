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

from jdistill.diffusion import sigmas as sigmas_lib
from jdistill.diffusion.consistency import discrete_skip_starts
from jdistill.diffusion.schedules import CosineVP, DiscreteVP, RectifiedFlow, shift_time

SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class TimeGrid:
    t: jax.Array
    t_next: jax.Array
    # the scheduler's sigma at t and t_next, for grids whose noise levels are not the schedule's
    # at t (Karras sigmas, sigmas interpolated between integer timesteps, flow sigmas the network
    # sees rounded down to integer timesteps): the network sees t, the solver step reads these.
    # diffusers' sigma = s / a on VP schedules, s (= t) on flow ones (``solvers.levels_from_sigma``).
    # None: the schedule's own at t.
    sigma: jax.Array | None = None
    sigma_next: jax.Array | None = None

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


def euler_timesteps(T: int, n: int, spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """Float timesteps of EulerDiscrete / EulerAncestral / Heun: as DDIM's, except that
    "linspace" is not rounded (its sigmas are interpolated between table entries)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(T, n, spacing, steps_offset).astype(np.float32)


# which of the skip grid's timesteps a consistency sampler visits: LCMScheduler's linear picks, or
# "quadratic" ones, denser near the clean end, where a few-step consistency sampler's last step decides
# the detail. The shape of DDIM's quadratic skip (Song et al. 2021, their CIFAR-10 grids), not its rule:
# DDIM squares a linspace up to sqrt(0.8 T) and ends at t = 0; these span the whole grid and keep its
# last step
CONSISTENCY_SPACINGS = ("lcm", "quadratic")


def consistency_picks(n: int, original_steps: int = 50, spacing: str = "lcm") -> np.ndarray:
    """Indices (ascending) into the descending skip grid of ``original_steps`` timesteps of the n
    a consistency sampler visits. "lcm": LCMScheduler's floor(linspace(0, original_steps, n,
    endpoint=False)); "quadratic": the remaining fractions (1 - i/n)^2 of the grid, rounded (4 of
    50: 50, 28, 12 and 3 steps from the clean end), kept distinct."""
    if not 1 <= n <= original_steps:
        raise ValueError(f"a consistency sampler needs 1 <= num_steps ({n}) <= original_inference_steps "
                         f"({original_steps})")
    if spacing == "lcm":
        return np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(np.int64)
    if spacing != "quadratic":
        raise ValueError(f"unknown consistency spacing {spacing!r}; expected one of {CONSISTENCY_SPACINGS}")
    remaining = np.round(original_steps * (1.0 - np.arange(n) / n) ** 2).astype(np.int64)
    for i in range(n - 1, -1, -1):  # at least one grid step per sampler step
        remaining[i] = max(remaining[i], 1 if i == n - 1 else remaining[i + 1] + 1)
    return original_steps - remaining


def lcm_timesteps(T: int, n: int, original_steps: int = 50, spacing: str = "lcm") -> np.ndarray:
    """LCMScheduler's: n of the distillation grid's ``original_steps`` timesteps (k = T //
    original_steps: 999, 979, ..., 19 for 50), at indices floor(linspace(0, original_steps, n,
    endpoint=False)). It reads no timestep_spacing or steps_offset; ``spacing="quadratic"`` picks
    as ``consistency_picks`` says."""
    if not 1 <= n <= original_steps <= T:
        raise ValueError(f"LCM needs 1 <= num_steps ({n}) <= original_inference_steps ({original_steps}) <= {T}")
    origin = discrete_skip_starts(T, original_steps)[::-1]
    return origin[consistency_picks(n, original_steps, spacing)].astype(np.int32)


def lcm_unit_grid(schedule, n: int, original_steps: int = 50, spacing: str = "lcm") -> TimeGrid:
    """LCM / CoDi sampling on a continuous schedule: LCMScheduler's picks (or ``spacing``'s) from the
    skip grid of ``original_steps`` unit times (the grid a consistency student was trained on, see
    ``diffusion.consistency.skip_grid``), each step landing on the next pick, the last on 0."""
    remaining = original_steps - consistency_picks(n, original_steps, spacing)  # grid steps left at each pick
    u = np.concatenate([remaining, [0]]).astype(np.float64) / original_steps
    if isinstance(schedule, RectifiedFlow) and schedule.shift != 1.0:
        u = shift_time(u, schedule.shift)
    return _grid(u[:-1].astype(np.float32), u[1:].astype(np.float32), jnp.float32)


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


def unit_grid(schedule, n: int, shift: float = 1.0) -> TimeGrid:
    """n equal steps in unit time (1 -> 0) mapped to the schedule's units: the grid a
    progressively distilled N-step student was trained on, for any schedule. ``shift`` S moves
    each unit time u to SD3's S u / (1 + (S - 1) u) first (1: none), as FastGen's LADD spaces
    its students' steps."""
    u = np.linspace(1.0, 0.0, n + 1, dtype=np.float64)
    if shift != 1.0:
        u = shift_time(u, float(shift))
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


def flow_multistep_grid(n: int, shift: float = 1.0, T: int = 1000, solver: str = "dpmpp_2m") -> TimeGrid:
    """The flow sigmas of diffusers' multistep schedulers (``use_flow_sigmas=True``, ``flow_shift`` =
    the schedule's shift), ending at 0: DPMSolverMultistepScheduler's (DPM-Solver++ 2M / SDE)
    shift(1 - linspace(1, 1 / T, n + 1)) flipped, UniPCMultistepScheduler's shift(linspace(1, 1 / T,
    n + 1)[:-1]) (its first 1 moved to 1 - 1e-6). Not FlowMatchEuler's grid (``flow_grid``), whose
    last step is 1 / T long: the second-order multistep then takes one long step before it, and the
    DPM-Solver++ FD of the digits flow teacher fell and rose with the step count (4: 12.4, 6: 15.8,
    12: 7.8). Both schedulers give the network int64 timesteps int(sigma T); the solver steps
    between the sigmas themselves (``TimeGrid.sigma``, here t itself)."""
    if solver == "unipc":
        sig = shift_time(np.linspace(1, 1 / T, n + 1)[:-1], shift)
        if np.fabs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6
    else:
        sig = np.flip(shift_time(1.0 - np.linspace(1, 1 / T, n + 1), shift))[:-1].copy()
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    t = (sig[:-1] * T).astype(np.int64).astype(np.float32) / np.float32(T)
    return TimeGrid(t=jnp.asarray(t), t_next=jnp.asarray(np.concatenate([t[1:], [0.0]]).astype(np.float32)),
                    sigma=jnp.asarray(sig[:-1]), sigma_next=jnp.asarray(sig[1:]))


def sigma_grid(ts, sigmas, last_sigma: float, t_dtype=jnp.float32) -> TimeGrid:
    """Steps from each (t, sigma) to the next; the last lands on ``last_sigma`` (t = -1 when
    that is 0, the clean end; else timestep 0)."""
    ts = np.asarray(ts)
    sig = np.concatenate([np.asarray(sigmas, np.float64), [last_sigma]]).astype(np.float32)
    t_last = -1 if last_sigma == 0 else 0
    return TimeGrid(t=jnp.asarray(ts, t_dtype), t_next=jnp.asarray(np.concatenate([ts[1:], [t_last]]), t_dtype),
                    sigma=jnp.asarray(sig[:-1]), sigma_next=jnp.asarray(sig[1:]))


def euler_grid(alphas_cumprod, ts, karras: bool = False, sigma_min=None, sigma_max=None,
               final: str = "zero") -> TimeGrid:
    """EulerDiscrete / EulerAncestral / Heun: sigmas interpolated at the (float) timesteps ``ts``;
    with ``karras``, Karras sigmas between their ends (or the config's sigma_min / sigma_max),
    the network then seeing the float timesteps of those sigmas."""
    ts = np.asarray(ts, np.float32)
    sig = sigmas_lib.interpolate(alphas_cumprod, ts)
    if karras:
        lo = sig[-1].item() if sigma_min is None else sigma_min
        hi = sig[0].item() if sigma_max is None else sigma_max
        sig = sigmas_lib.karras(lo, hi, len(ts))
        ts = sigmas_lib.sigma_to_t(sig, alphas_cumprod).astype(np.float32)
    return sigma_grid(ts, sig, sigmas_lib.final_sigma(alphas_cumprod, final))


def dpm_karras_grid(alphas_cumprod, n: int, round_t: bool = True, sigma_min=None, sigma_max=None,
                    final: str = "zero", final_is_last_karras: bool = False) -> TimeGrid:
    """DPMSolverMultistep / UniPC with Karras sigmas: n Karras sigmas over the whole table (or
    between the config's sigma_min / sigma_max) at integer timesteps, rounded from their float
    timestep, or truncated (DPM-Solver does not round for squaredcos_cap_v2). A "sigma_min"
    final step lands on timestep 0's sigma, or (UniPC) repeats the last Karras sigma."""
    table = sigmas_lib.table_sigmas(alphas_cumprod)
    lo = table[0].item() if sigma_min is None else sigma_min
    hi = table[-1].item() if sigma_max is None else sigma_max
    sig = sigmas_lib.karras(lo, hi, n)
    t = sigmas_lib.sigma_to_t(sig, alphas_cumprod)
    t = np.round(t) if round_t else t
    last = sig[-1] if final == "sigma_min" and final_is_last_karras else sigmas_lib.final_sigma(alphas_cumprod, final)
    return sigma_grid(t.astype(np.int64), sig, last, jnp.int32)


def final_grid(grid: TimeGrid, last_t: int) -> TimeGrid:
    """The grid with its last step landing on ``last_t`` (0 for a sigma_min final step) instead
    of the clean end."""
    return grid.replace(t_next=grid.t_next.at[-1].set(last_t))


def check_custom(timesteps, T: int) -> np.ndarray:
    """A custom timestep list as diffusers accepts it: descending, within [0, T)."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or len(ts) == 0 or np.any(np.diff(ts) >= 0) or ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"custom timesteps must be descending within [0, {T}), got {ts.tolist()}")
    return ts


# solvers whose diffusers scheduler takes a custom timestep list, and how the list becomes a grid
CUSTOM_TIMESTEPS = ("ddpm", "dpmpp_2m", "dpmpp_sde", "heun", "lcm", "codi", "tcd")


def custom_grid(schedule, solver: str, timesteps) -> TimeGrid:
    """``set_timesteps(timesteps=[...])`` (SDXL-Lightning / Hyper-SD style [999, 749, 499, 249]):
    each listed timestep steps to the next, the last to the clean end."""
    if solver not in CUSTOM_TIMESTEPS:
        raise ValueError(f"solver {solver!r}: its diffusers scheduler takes no custom timesteps "
                         f"(those that do: {CUSTOM_TIMESTEPS}); use trailing spacing for [999, 749, 499, 249]")
    ts = check_custom(timesteps, schedule.num_train_timesteps)
    if solver == "heun":
        return euler_grid(schedule.alphas_cumprod, ts.astype(np.float32))
    if not np.array_equal(ts, np.round(ts)):
        raise ValueError(f"solver {solver!r} takes integer timesteps, got {ts}")
    return _solver_chain(solver, ts.astype(np.int32))


def custom_unit_grid(schedule, solver: str, times) -> TimeGrid:
    """Custom times on a continuous VP schedule: unit times in (0, 1], descending (4 consistency
    steps: 1.0, 0.56, 0.24, 0.06), each stepping to the next, the last to the clean end. No
    diffusers scheduler runs these schedules, so every solver that steps a chain of times takes them."""
    if isinstance(schedule, RectifiedFlow):
        raise ValueError("custom timesteps on a flow schedule are not supported (its grids are shifted sigmas)")
    if solver == "tcd":
        raise ValueError("solver 'tcd' steps between integer timesteps: it needs a discrete schedule")
    u = np.asarray(times, np.float64)
    # judged as the float32 the sampler steps on: two times one float32 apart would be a zero-length step
    u32 = u.astype(np.float32)
    if u.ndim != 1 or len(u) == 0 or np.any(np.diff(u32) >= 0) or u[0] > 1.0 or u32[-1] <= 0.0:
        raise ValueError(f"custom times on a continuous schedule must be descending unit times in (0, 1], "
                         f"got {u.tolist()}")
    u = np.concatenate([u32, [0.0]]).astype(np.float32)
    return _grid(u[:-1], u[1:], jnp.float32)


def _solver_chain(solver: str, ts) -> TimeGrid:
    """The listed timesteps chained; TCDScheduler's last step lands on timestep 0, not the clean end."""
    grid = chain_grid(ts)
    return final_grid(grid, 0) if solver == "tcd" else grid


def make_grid(schedule, num_steps: int, solver: str = "ddim", spacing: str | None = None,
              steps_offset: int = 0, set_alpha_to_one: bool = True, *, timesteps=None,
              original_inference_steps: int = 50) -> TimeGrid:
    """The grid a diffusers user would get for this schedule and solver (its scheduler's defaults).

    Discrete schedules follow each diffusers scheduler's own rule (DDIM steps by T // n; DDPM,
    DPM-Solver and UniPC chain their listed timesteps; Heun and Euler ancestral interpolate
    sigmas; LCM / CoDi pick from the ``original_inference_steps`` grid); ``timesteps``: a custom
    list (``custom_grid``; on continuous VP schedules unit times, ``custom_unit_grid``). Continuous schedules use equal steps in t (``unit_grid``), flow
    schedules the sigma list of the diffusers scheduler of that solver (FlowMatchEuler's, or the
    multistep schedulers' ``use_flow_sigmas`` one: ``flow_multistep_grid``); LCM / CoDi there pick
    from the unit skip grid (``lcm_unit_grid``).
    """
    if isinstance(schedule, DiscreteVP):
        T = schedule.num_train_timesteps
        if timesteps is not None:
            return custom_grid(schedule, solver, timesteps)
        if solver in ("ddim", "stochastic"):
            return ddim_grid(T, num_steps, spacing or "leading", steps_offset, set_alpha_to_one)
        if solver == "ddpm":
            return chain_grid(spaced_timesteps(T, num_steps, spacing or "leading", steps_offset))
        if solver in ("dpmpp_2m", "dpmpp_sde", "unipc"):
            return chain_grid(dpm_timesteps(T, num_steps, spacing or "linspace", steps_offset))
        if solver in ("heun", "euler_ancestral"):
            return euler_grid(schedule.alphas_cumprod, euler_timesteps(T, num_steps, spacing or "linspace", steps_offset))
        if solver in ("lcm", "codi", "tcd"):  # TCDScheduler picks its timesteps as LCMScheduler does
            return _solver_chain(solver, lcm_timesteps(T, num_steps, original_inference_steps, spacing or "lcm"))
        raise ValueError(f"solver {solver!r} has no grid on a discrete VP schedule (ddim, stochastic, ddpm, "
                         "dpmpp_2m, dpmpp_sde, unipc, heun, euler_ancestral, lcm, codi or tcd; euler is for flow schedules)")
    if timesteps is not None:
        return custom_unit_grid(schedule, solver, timesteps)
    if solver == "tcd":
        raise ValueError("solver 'tcd' steps between integer timesteps: it needs a discrete schedule")
    if solver in ("lcm", "codi"):
        return lcm_unit_grid(schedule, num_steps, original_inference_steps, spacing or "lcm")
    if isinstance(schedule, RectifiedFlow) and solver in ("dpmpp_2m", "dpmpp_sde", "unipc"):
        return flow_multistep_grid(num_steps, schedule.shift, schedule.num_train_timesteps, solver)
    if isinstance(schedule, RectifiedFlow):
        return flow_grid(num_steps, schedule.shift, schedule.num_train_timesteps)
    if isinstance(schedule, CosineVP):
        return unit_grid(schedule, num_steps)
    raise TypeError(f"no time grid for schedule {type(schedule).__name__}")
