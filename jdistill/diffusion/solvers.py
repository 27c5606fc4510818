"""Single steps of the reverse process, written on (a, s) pairs only.

Each step moves z from time t (a_t, s_t) to time s (a_s, s_s) given the
denoiser's (x0, eps) at t. They follow diffusers' schedulers term for term
(see tests/test_solvers_parity.py) but take no schedule object, so the
same code serves discrete, continuous and flow schedules.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdistill.diffusion.schedules import RectifiedFlow


def forward(x0, eps, a, s):
    """q(z_t | x): z_t = a x + s eps."""
    return a * x0 + s * eps


def ddim_step(x0, eps, a_t, s_t, a_s, s_s, eta=0.0, noise=None):
    """DDIM (Song et al.) with diffusers' eta: eta=0 deterministic, eta=1 DDPM-like."""
    # clamp: a step *up* in noise (used by re-noising samplers) has no posterior variance
    var = jnp.maximum((s_s**2 / s_t**2) * (1.0 - a_t**2 / a_s**2), 0.0)
    std = eta * jnp.sqrt(var)
    out = a_s * x0 + jnp.sqrt(s_s**2 - std**2) * eps
    if noise is not None:
        out = out + std * noise
    return out


DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def ddpm_step(z, x0, a2_t, s2_t, a2_s, s2_s, noise, variance="fixed_small", variance_out=None):
    """Ancestral step of q(z_s | z_t, x0), posterior mean plus noise (diffusers' DDPMScheduler).

    Takes the variances a^2, s^2 (alpha_bar, 1 - alpha_bar), not their roots:
    the step's beta = 1 - a2_t / a2_s cancels badly on rounded roots.
    ``variance``: "fixed_small" (posterior variance), "fixed_large" (beta_t) or
    "learned_range" (improved DDPM / DiT: interpolate log beta_t and the log
    posterior variance with the network's extra channels in [-1, 1]).
    Pass ``noise=None`` for a deterministic (mean-only) step.
    """
    alpha = a2_t / a2_s  # 1 - beta of the (respaced) step
    beta = 1.0 - alpha
    mean = (jnp.sqrt(a2_s) * beta / s2_t) * x0 + (jnp.sqrt(alpha) * s2_s / s2_t) * z
    if noise is None:
        return mean
    post_var = jnp.maximum(s2_s / s2_t * beta, 1e-20)
    if variance == "fixed_small":
        std = jnp.sqrt(post_var)
    elif variance == "fixed_large":
        std = jnp.sqrt(beta)
    elif variance == "learned_range":
        if variance_out is None:
            raise ValueError("variance='learned_range' needs a denoiser with a learned variance output")
        frac = (variance_out + 1.0) / 2.0
        std = jnp.exp(0.5 * (frac * jnp.log(beta) + (1.0 - frac) * jnp.log(post_var)))
    else:
        raise ValueError(f"unknown DDPM variance {variance!r}; expected one of {DDPM_VARIANCES}")
    return mean + std * noise


def euler_step(x0, eps, s_t, s_s, z):
    """Euler on the rectified-flow ODE dz/dt = eps - x0 (t = sigma)."""
    return z + (s_s - s_t) * (eps - x0)


def half_logsnr(a, s):
    """lambda = log(a / s), DPM-Solver's time variable (+inf at the clean end)."""
    return jnp.log(a) - jnp.log(s)


def dpmpp_2m_step(z, x0, x0_prev, a_t, s_t, a_s, s_s, lam_prev, second_order):
    """DPM-Solver++ (2M, midpoint), data prediction, as diffusers' DPMSolverMultistepScheduler.

    ``x0_prev`` and ``lam_prev`` come from the previous step; ``second_order``
    (bool, may be traced) picks the multistep update, else the first-order one.
    """
    lam_t, lam_s = half_logsnr(a_t, s_t), half_logsnr(a_s, s_s)
    h = lam_s - lam_t
    phi = a_s * (jnp.exp(-h) - 1.0)
    first = (s_s / s_t) * z - phi * x0
    # r0 is only meaningful on second-order steps; keep it finite elsewhere
    r0 = jnp.where(second_order, (lam_t - lam_prev) / h, 1.0)
    d1 = (x0 - x0_prev) / r0
    return jnp.where(second_order, first - 0.5 * phi * d1, first)


def renoise(z, a_from, s_from, a_to, s_to, noise):
    """Forward process from a less noisy time to a noisier one: q(z_to | z_from)."""
    ratio = a_to / a_from
    return ratio * z + jnp.sqrt(jnp.maximum(s_to**2 - ratio**2 * s_from**2, 0.0)) * noise


# ---------------------------------------------------------------- sigma-stepping schedulers
# diffusers' Euler / Heun / DPM-Solver with Karras sigmas work in sigma = s / a (and Euler-type
# schedulers in x = z / a); these steps take sigma as the scheduler holds it.


def vp_from_sigma(sigma):
    """(a, s) of diffusers' sigma = s / a, computed as its schedulers do: a = 1 / sqrt(sigma^2 + 1)."""
    a = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return a, sigma * a


def levels_from_sigma(schedule, sigma):
    """(a, s) of a grid's own noise level ``TimeGrid.sigma``: diffusers' sigma = s / a on VP schedules,
    its flow sigma = s (a = 1 - s) on flow ones, as its schedulers' ``_sigma_to_alpha_sigma_t``."""
    if isinstance(schedule, RectifiedFlow):
        return 1.0 - sigma, sigma
    return vp_from_sigma(sigma)


def dpmpp_step(z, x0, x0_prev, a_t, s_t, a_s, s_s, lam_prev, second_order, solver_type="midpoint", noise=None):
    """DPM-Solver++ of order 1 or 2 (``second_order``, may be traced), diffusers' midpoint or heun
    second-order term; with ``noise``, the SDE variant (sde-dpmsolver++), whose first-order part
    keeps exp(-h) of z and adds noise of variance s_s^2 (1 - exp(-2h))."""
    lam_t, lam_s = half_logsnr(a_t, s_t), half_logsnr(a_s, s_s)
    h = lam_s - lam_t
    r0 = jnp.where(second_order, (lam_t - lam_prev) / h, 1.0)
    d1 = (x0 - x0_prev) / r0
    if noise is None:
        phi = a_s * (jnp.exp(-h) - 1.0)
        first = (s_s / s_t) * z - phi * x0
        d1_term = -0.5 * phi * d1 if solver_type == "midpoint" else a_s * ((jnp.exp(-h) - 1.0) / h + 1.0) * d1
        return jnp.where(second_order, first + d1_term, first)
    decay = 1.0 - jnp.exp(-2.0 * h)
    first = (s_s / s_t * jnp.exp(-h)) * z + (a_s * decay) * x0
    d1_term = 0.5 * (a_s * decay) * d1 if solver_type == "midpoint" else a_s * (decay / (-2.0 * h) + 1.0) * d1
    return jnp.where(second_order, first + d1_term, first) + s_s * jnp.sqrt(decay) * noise


def euler_ancestral_step(z, x0, a_t, sig_t, a_s, sig_s, noise):
    """EulerAncestralDiscreteScheduler in x = z / a: an Euler step to sigma_down, then fresh noise of
    std sigma_up (sigma_down^2 + sigma_up^2 = sigma_s^2, sigma_up^2 = sigma_s^2 (1 - sigma_s^2 / sigma_t^2))."""
    sig_up = jnp.sqrt(sig_s**2 * (sig_t**2 - sig_s**2) / sig_t**2)
    sig_down = jnp.sqrt(sig_s**2 - sig_up**2)
    x = z / a_t
    x = x + (x - x0) / sig_t * (sig_down - sig_t) + noise * sig_up
    return a_s * x


def ve_slope(z, x0, a, sig):
    """dx/dsigma = (x - x0) / sigma at z, in x = z / a (Euler's and Heun's derivative). Taking it
    from x, as diffusers does, keeps its rounding proportional to x: with zero terminal SNR
    (sigma = 4096) the step x + slope dt cancels to 1 / 200 of x."""
    return (z / a - x0) / sig


def ve_euler(z, slope, a_t, sig_t, a_s, sig_s):
    """An Euler step in x = z / a from sigma_t to sigma_s, back in z (the same update as a
    deterministic DDIM step, rounded as diffusers' EulerDiscreteScheduler rounds it)."""
    return a_s * (z / a_t + slope * (sig_s - sig_t))


def heun_correct(z, slope, slope_next, a_t, sig_t, a_s, sig_s):
    """Heun's second stage: the Euler step again with the mean of both slopes."""
    return a_s * (z / a_t + (slope + slope_next) / 2 * (sig_s - sig_t))


# ---------------------------------------------------------------- consistency models


def lcm_step(z, x0, c_skip, c_out, a_s, s_s, noise, last):
    """LCMScheduler: the consistency function's output c_out x0 + c_skip z, re-noised with fresh
    noise to the next timestep except on the last step (``last`` may be traced)."""
    denoised = c_out * x0 + c_skip * z
    return jnp.where(last, denoised, a_s * denoised + s_s * noise)


def codi_step(z, x0, eps, c_skip, c_out, a_s, s_s):
    """CoDi's deterministic sampler: the consistency output taken as x, the predicted eps kept."""
    return a_s * (c_skip * z + c_out * x0) + s_s * eps
