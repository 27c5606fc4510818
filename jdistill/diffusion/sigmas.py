"""Noise levels sigma = s / a as diffusers' sigma-stepping schedulers compute them.

Karras sigmas fall between the training timesteps, and Euler-type schedulers interpolate sigma
(not log alpha_bar) at non-integer timesteps, so the timestep the network sees and the noise
level the step uses come apart (``timesteps.sigma_grid`` keeps both). numpy, with diffusers'
dtypes: float64 where it works in float64, float32 where it casts.

Functions take the alpha_bar table, not a schedule: mapping sigmas back to timesteps turns a
table 1e-6 off into timesteps 1e-4 off, so the planner passes diffusers' own table
(``schedules.diffusers_alphas_cumprod``).
"""

from __future__ import annotations

import numpy as np

RHO = 7.0  # Karras et al.'s rho, fixed in diffusers


def table_sigmas(alphas_cumprod) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at every training timestep (float32)."""
    ab = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt((1.0 - ab) / ab)


def interpolate(alphas_cumprod, ts) -> np.ndarray:
    """Sigma at (possibly non-integer) timesteps, linear in sigma between table entries."""
    table = table_sigmas(alphas_cumprod)
    return np.interp(np.asarray(ts), np.arange(len(table)), table)


def karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, equally spaced in sigma^(1 / rho) (Karras et al. 2022)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
    return (hi + ramp * (lo - hi)) ** RHO


def sigma_to_t(sigmas, alphas_cumprod) -> np.ndarray:
    """The (float) timestep of each sigma, linear in log sigma between the two table entries
    around it and clipped to the table, as diffusers' ``_sigma_to_t``."""
    log_table = np.log(table_sigmas(alphas_cumprod))
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    dists = log_sigma - log_table[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def final_sigma(alphas_cumprod, kind: str) -> float:
    """diffusers' ``final_sigmas_type``: "zero" (the clean end) or "sigma_min" (timestep 0's sigma)."""
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(table_sigmas(alphas_cumprod)[0])
    raise ValueError(f"unknown final_sigmas_type {kind!r}; expected 'zero' or 'sigma_min'")
