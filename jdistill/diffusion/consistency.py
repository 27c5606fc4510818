"""Consistency-model boundary scalings (LCM / CoDi).

f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t), with t the integer timestep
0..999 and sigma_data = 0.5; LCM scales t by 10 so that c_skip ~ 1 only
very near t = 0.
"""

from __future__ import annotations

import jax.numpy as jnp


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
