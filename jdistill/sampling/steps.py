"""The solver steps added after the first five of ``samplers.py``: one function per solver, each
one model call (two for Heun) and an update, reading what it needs from a :class:`Step`.

These also run the first solvers' variants that need more than their original code path:
"ddim" on a sigma grid (diffusers' EulerDiscreteScheduler with Karras or interpolated sigmas)
and "dpmpp_2m" with solver_type "heun", solver_order 1 or a second-order last step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jdistill.diffusion import solvers, unipc
from jdistill.diffusion.consistency import scalings_at
from jdistill.diffusion.schedules import RectifiedFlow


@dataclasses.dataclass(frozen=True)
class Step:
    """One grid step: where it starts and lands, and how to call the model there."""

    denoiser: object
    t: jax.Array
    t_next: jax.Array
    index: jax.Array
    num_steps: int
    key: jax.Array
    cond: object = None
    guidance_scale: object = None
    uncond: object = None
    clip_x0: float | None = None
    sigma: jax.Array | None = None  # the grid's sigma = s / a at t, when it has its own
    sigma_next: jax.Array | None = None

    @property
    def is_first(self):
        return self.index == 0

    @property
    def is_last(self):
        return self.index == self.num_steps - 1

    def levels(self, at_next: bool = False):
        """Scalar (a, s) at t (or t_next): from the grid's sigma when it has one, else the schedule's."""
        t, sigma = (self.t_next, self.sigma_next) if at_next else (self.t, self.sigma)
        if sigma is None:
            return self.denoiser.schedule.alpha_sigma(t)
        return solvers.levels_from_sigma(self.denoiser.schedule, sigma)

    def sigma_at(self, at_next: bool = False):
        """diffusers' VP sigma = s / a at t (or t_next)."""
        sigma = self.sigma_next if at_next else self.sigma
        if sigma is not None and not isinstance(self.denoiser.schedule, RectifiedFlow):
            return sigma
        a, s = self.levels(at_next)
        return s / a

    def predict(self, z, at_next: bool = False):
        """The model's (x0, eps) at z, read at this grid's noise level; x0 clipped as diffusers'
        clip_sample does (eps left as predicted)."""
        t = self.t_next if at_next else self.t
        pred = self.denoiser.predict(z, t, self.cond, self.guidance_scale, self.uncond, alpha_sigma=self.levels(at_next))
        if self.clip_x0 is not None:
            pred = pred.replace(x0=jnp.clip(pred.x0, -self.clip_x0, self.clip_x0))
        return pred

    def noise(self, like):
        return jax.random.normal(self.key, like.shape, like.dtype)


def ddim(step: Step, state, eta=0.0):
    """DDIM on a sigma grid. Deterministic and unclipped, it is diffusers' Euler step
    (EulerDiscreteScheduler), taken in its variables x = z / a as diffusers rounds it."""
    pred = step.predict(state.z)
    if isinstance(eta, (int, float)) and eta == 0 and step.clip_x0 is None:
        (a_t, _), (a_s, _) = step.levels(), step.levels(True)
        sig_t, sig_s = step.sigma_at(), step.sigma_at(True)
        z = solvers.ve_euler(state.z, solvers.ve_slope(state.z, pred.x0, a_t, sig_t), a_t, sig_t, a_s, sig_s)
    else:
        z = solvers.ddim_step(pred.x0, pred.eps, *step.levels(), *step.levels(True), eta=eta,
                              noise=step.noise(state.z))
    return state.replace(z=z, x0_prev=pred.x0)


def _check_option(name, value, allowed, solver):
    if value not in allowed:
        raise ValueError(f"{solver}: {name}={value!r}; expected one of {allowed}")


def dpmpp(step: Step, state, sde: bool = False, solver_order=2, solver_type=None, lower_order_final=True):
    """DPM-Solver++ multistep (ODE or SDE), first order on the first step and, with
    ``lower_order_final``, on the last."""
    _check_option("solver_order", solver_order, (1, 2), "DPM-Solver++")
    _check_option("solver_type", solver_type, (None, "midpoint", "heun"), "DPM-Solver++")
    pred = step.predict(state.z)
    (a_t, s_t), (a_s, s_s) = step.levels(), step.levels(True)
    final_first = step.is_last if lower_order_final else False
    second = solver_order == 2 and ~step.is_first & ~jnp.asarray(final_first)
    noise = step.noise(state.z) if sde else None
    z = solvers.dpmpp_step(state.z, pred.x0, state.x0_prev, a_t, s_t, a_s, s_s, state.lam_prev, second,
                           solver_type or "midpoint", noise)
    return state.replace(z=z, x0_prev=pred.x0, lam_prev=solvers.half_logsnr(a_t, s_t).astype(jnp.float32))


def euler_ancestral(step: Step, state):
    pred = step.predict(state.z)
    (a_t, _), (a_s, _) = step.levels(), step.levels(True)
    z = solvers.euler_ancestral_step(state.z, pred.x0, a_t, step.sigma_at(), a_s, step.sigma_at(True),
                                     step.noise(state.z))
    return state.replace(z=z, x0_prev=pred.x0)


def heun(step: Step, state):
    """Heun (diffusers' HeunDiscreteScheduler): an Euler step, then the model again where it
    lands and the step redone with the mean slope; the last step (to sigma 0) is Euler only."""
    z = state.z
    x0 = step.predict(z).x0
    (a_t, _), (a_s, _) = step.levels(), step.levels(True)
    sig_t, sig_s = step.sigma_at(), step.sigma_at(True)
    slope = solvers.ve_slope(z, x0, a_t, sig_t)

    def euler():
        return solvers.ve_euler(z, slope, a_t, sig_t, a_s, sig_s)

    def corrected():
        z_mid = euler()
        slope_next = solvers.ve_slope(z_mid, step.predict(z_mid, at_next=True).x0, a_s, sig_s)
        return solvers.heun_correct(z, slope, slope_next, a_t, sig_t, a_s, sig_s)

    return state.replace(z=jax.lax.cond(step.is_last, euler, corrected), x0_prev=x0)


def unipc_history(z, solver_order: int) -> dict:
    """UniPC's carry besides x0_prev / lam_prev: the corrected previous sample, its s, and the
    solver_order - 1 data predictions (and lambdas) before x0_prev, newest first."""
    older = solver_order - 1
    return {"z_prev": jnp.zeros_like(z), "s_prev": jnp.zeros((), jnp.float32),
            "x0_older": tuple(jnp.zeros_like(z) for _ in range(older)),
            "lam_older": tuple(jnp.zeros((), jnp.float32) for _ in range(older))}


def unipc_step(step: Step, state, solver_order=2, solver_type=None, lower_order_final=True):
    """UniPC (bh1 / bh2, data prediction): correct the point just reached with the model output
    there (from the second step), then predict the next point."""
    _check_option("solver_order", solver_order, (1, 2, 3), "UniPC")
    _check_option("solver_type", solver_type, (None,) + unipc.VARIANTS, "UniPC")
    variant = solver_type or "bh2"
    hist = state.extra
    m_t = step.predict(state.z).x0
    (a_t, s_t), (a_s, s_s) = step.levels(), step.levels(True)
    lam_t, lam_s = solvers.half_logsnr(a_t, s_t), solvers.half_logsnr(a_s, s_s)

    k_prev = unipc.step_order(step.index - 1, step.num_steps, solver_order, lower_order_final)
    correctors = [lambda: state.z] + [
        functools.partial(unipc.correct, hist["z_prev"], state.x0_prev, m_t, hist["x0_older"], hist["lam_older"],
                          state.lam_prev, hist["s_prev"], lam_t, a_t, s_t, order=k, variant=variant)
        for k in range(1, solver_order + 1)]
    z = jax.lax.switch(jnp.maximum(k_prev, 0), correctors)

    newer_m = (state.x0_prev,) + hist["x0_older"]
    newer_lam = (state.lam_prev,) + hist["lam_older"]
    k = unipc.step_order(step.index, step.num_steps, solver_order, lower_order_final)
    predictors = [functools.partial(unipc.predict, z, m_t, newer_m, newer_lam, lam_t, s_t, lam_s, a_s, s_s,
                                    order=order, variant=variant) for order in range(1, solver_order + 1)]
    z_next = jax.lax.switch(k - 1, predictors)
    extra = {"z_prev": z, "s_prev": jnp.asarray(s_t, jnp.float32), "x0_older": newer_m[: solver_order - 1],
             "lam_older": newer_lam[: solver_order - 1]}
    return state.replace(z=z_next, x0_prev=m_t, lam_prev=jnp.asarray(lam_t, jnp.float32), extra=extra)


def lcm(step: Step, state, timestep_scaling=10.0):
    """LCMScheduler: the consistency output at t, re-noised with fresh noise to t_next but on the last step."""
    x0 = step.predict(state.z).x0
    c_skip, c_out = scalings_at(step.denoiser.schedule, step.t, timestep_scaling=timestep_scaling)
    a_s, s_s = step.levels(True)
    z = solvers.lcm_step(state.z, x0, c_skip, c_out, a_s, s_s, step.noise(state.z), step.is_last)
    return state.replace(z=z, x0_prev=x0)


def tcd(step: Step, state, eta=0.0):
    """TCDScheduler (Zheng et al.; Hyper-SD's one-step sampler), eta being the paper's gamma: a
    deterministic DDIM step past t_next to the integer timestep floor((1 - eta) t_next), then the
    forward process back up to t_next with fresh noise, except on the last step (which lands there:
    timestep 0, as the grid's last t_next). It is the "stochastic" solver's shape with TCD's
    landing point."""
    pred = step.predict(state.z)
    # in float32 and floored, as torch computes (1 - eta) * prev_timestep on a long tensor
    t_far = jnp.floor((1.0 - eta) * step.t_next.astype(jnp.float32)).astype(jnp.int32)
    a_f, s_f = step.denoiser.schedule.alpha_sigma(t_far)
    z_far = solvers.ddim_step(pred.x0, pred.eps, *step.levels(), a_f, s_f)
    if isinstance(eta, (int, float)) and eta == 0:  # static: t_far is t_next, no noise to draw
        return state.replace(z=z_far, x0_prev=pred.x0)
    a_s, s_s = step.levels(True)
    z = jnp.where(step.is_last, z_far, solvers.renoise(z_far, a_f, s_f, a_s, s_s, step.noise(state.z)))
    return state.replace(z=z, x0_prev=pred.x0)


def codi(step: Step, state, timestep_scaling=10.0):
    """CoDi's deterministic multistep sampler on the LCM grid (no fresh noise)."""
    pred = step.predict(state.z)
    c_skip, c_out = scalings_at(step.denoiser.schedule, step.t, timestep_scaling=timestep_scaling)
    a_s, s_s = step.levels(True)
    z = solvers.codi_step(state.z, pred.x0, pred.eps, c_skip, c_out, a_s, s_s)
    return state.replace(z=z, x0_prev=pred.x0)


def renoise(step: Step, state):
    """LADD's (and ADD's) few-step sampler: the model's x0, re-noised with fresh noise to t_next, the
    last step landing on x0. It is LCM's step with the identity in place of the consistency
    scalings (c_skip = 0, c_out = 1)."""
    x0 = step.predict(state.z).x0
    a_s, s_s = step.levels(True)
    z = solvers.lcm_step(state.z, x0, 0.0, 1.0, a_s, s_s, step.noise(state.z), step.is_last)
    return state.replace(z=z, x0_prev=x0)
