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

SOLVERS = ("ddim", "ddpm", "dpmpp_2m", "euler", "stochastic")


@struct.dataclass
class SolverState:
    z: jax.Array
    x0_prev: jax.Array  # previous data prediction (DPM-Solver++ multistep)
    lam_prev: jax.Array  # its log(a/s)


def init_state(z) -> SolverState:
    return SolverState(z=z, x0_prev=jnp.zeros_like(z), lam_prev=jnp.zeros((), jnp.float32))


def solver_step(denoiser, state: SolverState, t, t_next, index, *, num_steps, t_end, solver, key,
                cond=None, guidance_scale=None, uncond=None, eta=0.0, clip_x0=None,
                ddpm_variance="fixed_small") -> SolverState:
    """One model call and one update from t to t_next (grid step ``index`` of ``num_steps``)."""
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
    return SolverState(z=z, x0_prev=x0, lam_prev=jnp.asarray(lam_prev, jnp.float32))


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

    def body(st, xs):
        t, t_next, i = xs
        st = solver_step(denoiser, st, t, t_next, i, num_steps=n, t_end=t_end, solver=solver,
                         key=jax.random.fold_in(rng, i), **options)
        return st, None

    xs = (grid.t[start:stop], grid.t_next[start:stop], jnp.arange(start, stop))
    state, _ = jax.lax.scan(body, state, xs)
    return state


def sample(denoiser, noise, cond=None, *, grid: TimeGrid, solver="ddim", rng=None, **options):
    """Run the whole grid from ``noise`` (z at grid.t[0]) and return the final z."""
    return run_steps(denoiser, init_state(noise), grid, 0, grid.num_steps, rng=rng, solver=solver,
                     cond=cond, **options).z


@functools.partial(jax.jit, static_argnames=("solver", "eta", "clip_x0", "ddpm_variance"))
def sample_jit(denoiser, noise, cond=None, *, grid, solver="ddim", rng=None, guidance_scale=None,
               uncond=None, eta=0.0, clip_x0=None, ddpm_variance="fixed_small"):
    """:func:`sample` compiled once per (denoiser structure, grid length, solver)."""
    return sample(denoiser, noise, cond, grid=grid, solver=solver, rng=rng, guidance_scale=guidance_scale,
                  uncond=uncond, eta=eta, clip_x0=clip_x0, ddpm_variance=ddpm_variance)
