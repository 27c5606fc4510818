"""Samplers: one ``lax.scan`` over a TimeGrid, one solver step per model call.

    x = sample(denoiser, noise, cond, grid=make_grid(schedule, 50, "ddim"),
               solver="ddim", guidance_scale=7.5, rng=key)

Solvers: "ddim" (eta), "ddpm" (ancestral, fixed or learned variance; the last step is mean-only,
where diffusers adds noise whenever t > 0, which matters for trailing grids
with fixed_large variance),
"dpmpp_2m" (DPM-Solver++ 2M, first order on the first and last step as
diffusers does), "euler" (rectified flow) and "stochastic" (Meng et al.'s
N-step sampler for distilled students: a deterministic step twice as long,
then re-noise to the next grid time; the last step is deterministic).
Added in ``steps.py``: "dpmpp_sde" (sde-dpmsolver++), "euler_ancestral", "heun" (two model
calls a step), "unipc", "lcm" (LCMScheduler: fresh noise between steps), "tcd" (TCDScheduler: eta is its
gamma), "codi" (CoDi's
deterministic consistency sampler) and "renoise" (LADD / ADD: x0, re-noised with fresh noise to the
next time). Grids with their own sigmas (``TimeGrid.sigma``: Karras,
interpolated) run with "ddim", "dpmpp_2m", "dpmpp_sde", "euler_ancestral", "heun" and "unipc".

The loop is split into :func:`run_steps` over a range of grid indices with
an explicit :class:`SolverState`, so that composite samplers (T-Stitch) can
hand the state from one denoiser to the next and stay bit-identical to one
uninterrupted loop: step i draws its noise from ``fold_in(rng, i)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jdistill.diffusion import solvers
from jdistill.diffusion.timesteps import TimeGrid
from jdistill.sampling import steps

SOLVERS = ("ddim", "ddpm", "dpmpp_2m", "euler", "stochastic", "dpmpp_sde", "euler_ancestral", "heun", "unipc",
           "lcm", "codi", "renoise", "tcd")
SIGMA_GRID_SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_sde", "euler_ancestral", "heun", "unipc")


@struct.dataclass
class SolverState:
    z: jax.Array
    x0_prev: jax.Array  # previous data prediction (DPM-Solver++ multistep)
    lam_prev: jax.Array  # its log(a/s)
    extra: dict = struct.field(default_factory=dict)  # longer histories (UniPC), filled by run_steps


def init_state(z) -> SolverState:
    return SolverState(z=z, x0_prev=jnp.zeros_like(z), lam_prev=jnp.zeros((), jnp.float32))


def _with_history(state: SolverState, solver: str, solver_order: int) -> SolverState:
    if solver == "unipc" and not state.extra:
        return state.replace(extra=steps.unipc_history(state.z, solver_order))
    return state


def _new_path(solver, sigma, solver_order, solver_type, lower_order_final) -> bool:
    """Whether a step runs in ``steps.py``: the added solvers, sigma grids, and DPM-Solver++
    variants; the first five keep their original code (and results)."""
    if sigma is not None and solver not in SIGMA_GRID_SOLVERS:
        raise ValueError(f"solver {solver!r} does not step on a grid with its own sigmas; "
                         f"those run with {SIGMA_GRID_SOLVERS}")
    if solver in ("ddim", "dpmpp_2m") and sigma is not None:
        return True
    if solver == "dpmpp_2m":
        return solver_order != 2 or solver_type not in (None, "midpoint") or not lower_order_final
    return solver not in ("ddim", "ddpm", "euler", "stochastic")


def _new_step(step: steps.Step, state, solver, eta, solver_order, solver_type, lower_order_final,
              timestep_scaling) -> SolverState:
    if solver == "ddim":
        return steps.ddim(step, state, eta)
    if solver in ("dpmpp_2m", "dpmpp_sde"):
        return steps.dpmpp(step, state, solver == "dpmpp_sde", solver_order, solver_type, lower_order_final)
    if solver == "euler_ancestral":
        return steps.euler_ancestral(step, state)
    if solver == "heun":
        return steps.heun(step, state)
    if solver == "unipc":
        return steps.unipc_step(step, state, solver_order, solver_type, lower_order_final)
    if solver == "lcm":
        return steps.lcm(step, state, timestep_scaling)
    if solver == "tcd":
        return steps.tcd(step, state, eta)
    if solver == "codi":
        return steps.codi(step, state, timestep_scaling)
    if solver == "renoise":
        return steps.renoise(step, state)
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


def solver_step(denoiser, state: SolverState, t, t_next, index, *, num_steps, t_end, solver, key,
                cond=None, guidance_scale=None, uncond=None, eta=0.0, clip_x0=None,
                ddpm_variance="fixed_small", sigma=None, sigma_next=None, solver_order=2, solver_type=None,
                lower_order_final=True, timestep_scaling=10.0) -> SolverState:
    """One update from t to t_next (grid step ``index`` of ``num_steps``): one model call, two for "heun".

    ``sigma`` / ``sigma_next``: the grid's own noise levels (``TimeGrid.sigma``). DPM-Solver++ and
    UniPC options as diffusers names them: ``solver_order`` (1 or 2; UniPC also 3),
    ``solver_type`` ("midpoint" / "heun"; UniPC "bh1" / "bh2"), ``lower_order_final`` (DPM-Solver++:
    the last step is first order; UniPC: no order above the steps left). ``timestep_scaling``:
    the consistency boundary scalings' (lcm, codi).
    """
    if _new_path(solver, sigma, solver_order, solver_type, lower_order_final):
        step = steps.Step(denoiser, t, t_next, index, num_steps, key, cond, guidance_scale, uncond, clip_x0,
                          sigma, sigma_next)
        return _new_step(step, state, solver, eta, solver_order, solver_type, lower_order_final, timestep_scaling)
    z = state.z
    pred = denoiser.predict(z, t, cond, guidance_scale, uncond)
    x0, eps = pred.x0, pred.eps
    if clip_x0 is not None:  # diffusers' clip_sample: x0 clipped, eps left as predicted
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    a_t, s_t = denoiser.alpha_sigma(t, z)
    a_s, s_s = denoiser.alpha_sigma(t_next, z)
    is_first, is_last = index == 0, index == num_steps - 1
    lam_prev = state.lam_prev

    if solver == "ddim":
        # eta = 0 (a Python number, static under jit) needs no noise: drawing it anyway costs a
        # few percent of a small model's step
        deterministic = isinstance(eta, (int, float)) and eta == 0
        noise = None if deterministic else jax.random.normal(key, z.shape, z.dtype)
        z = solvers.ddim_step(x0, eps, a_t, s_t, a_s, s_s, eta=eta, noise=noise)
    elif solver == "ddpm":
        noise = jax.random.normal(key, z.shape, z.dtype) * (1.0 - is_last)
        z = solvers.ddpm_step(z, x0, *denoiser.variances(t, z), *denoiser.variances(t_next, z), noise,
                              ddpm_variance, pred.variance)
    elif solver == "euler":
        z = solvers.euler_step(x0, eps, s_t, s_s, z)
    elif solver == "dpmpp_2m":
        z = solvers.dpmpp_2m_step(z, x0, state.x0_prev, a_t, s_t, a_s, s_s, state.lam_prev,
                                  second_order=~(is_first | is_last))
        lam_prev = solvers.half_logsnr(*denoiser.schedule.alpha_sigma(t))
    elif solver == "stochastic":
        # twice as far as the grid step, deterministically, then noise back up to t_next
        t_far = jnp.maximum(2 * t_next - t, t_end)
        a_f, s_f = denoiser.alpha_sigma(t_far, z)
        z_far = solvers.ddim_step(x0, eps, a_t, s_t, a_f, s_f)
        noise = jax.random.normal(key, z.shape, z.dtype)
        z_mid = solvers.renoise(z_far, a_f, s_f, a_s, s_s, noise)
        z = jnp.where(is_last, solvers.ddim_step(x0, eps, a_t, s_t, a_s, s_s), z_mid)
    else:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    return state.replace(z=z, x0_prev=x0, lam_prev=jnp.asarray(lam_prev, jnp.float32))


def run_steps(denoiser, state: SolverState, grid: TimeGrid, start: int, stop: int, *, rng=None,
              solver="ddim", **options) -> SolverState:
    """Grid steps [start, stop) with one denoiser, as a ``lax.scan``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    n = grid.num_steps
    if not 0 <= start <= stop <= n:
        raise ValueError(f"step range [{start}, {stop}) outside a grid of {n} steps")
    if start == stop:
        return state
    rng = jax.random.key(0) if rng is None else rng
    t_end = grid.t_next[-1]
    state = _with_history(state, solver, options.get("solver_order", 2))
    has_sigmas = grid.sigma is not None

    def body(st, xs):
        t, t_next, i = xs[:3]
        sig = dict(sigma=xs[3], sigma_next=xs[4]) if has_sigmas else {}
        st = solver_step(denoiser, st, t, t_next, i, num_steps=n, t_end=t_end, solver=solver,
                         key=jax.random.fold_in(rng, i), **sig, **options)
        return st, None

    xs = (grid.t[start:stop], grid.t_next[start:stop], jnp.arange(start, stop))
    if has_sigmas:
        xs += (grid.sigma[start:stop], grid.sigma_next[start:stop])
    state, _ = jax.lax.scan(body, state, xs)
    return state


def sample(denoiser, noise, cond=None, *, grid: TimeGrid, solver="ddim", rng=None, **options):
    """Run the whole grid from ``noise`` (z at grid.t[0]) and return the final z."""
    return run_steps(denoiser, init_state(noise), grid, 0, grid.num_steps, rng=rng, solver=solver,
                     cond=cond, **options).z


SAMPLE_OPTIONS = ("eta", "clip_x0", "ddpm_variance", "solver_order", "solver_type", "lower_order_final",
                  "timestep_scaling")


@functools.partial(jax.jit, static_argnames=("solver",) + SAMPLE_OPTIONS)
def sample_jit(denoiser, noise, cond=None, *, grid, solver="ddim", rng=None, guidance_scale=None,
               uncond=None, eta=0.0, clip_x0=None, ddpm_variance="fixed_small", solver_order=2, solver_type=None,
               lower_order_final=True, timestep_scaling=10.0):
    """:func:`sample` compiled once per (denoiser structure, grid length, solver, options)."""
    return sample(denoiser, noise, cond, grid=grid, solver=solver, rng=rng, guidance_scale=guidance_scale,
                  uncond=uncond, eta=eta, clip_x0=clip_x0, ddpm_variance=ddpm_variance, solver_order=solver_order,
                  solver_type=solver_type, lower_order_final=lower_order_final, timestep_scaling=timestep_scaling)
