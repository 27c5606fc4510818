"""UniPC (Zhao et al. 2023) with data prediction, as diffusers' UniPCMultistepScheduler runs it.

Each step predicts z at the next time from the current data prediction m0 and up to order - 1
older ones (UniP); from the second step on, the model output at the new point first corrects
that point (UniC), re-solving the previous step with one more order condition. Everything is
written on (a, s) and lambda = log(a / s); ``order`` is static (callers switch between orders).

One step from lambda0 to lambda_t, h = lambda_t - lambda0, hh = -h:
  h phi_1 = expm1(hh), B(h) = hh ("bh1") or expm1(hh) ("bh2"), r_k = (lambda_k - lambda0) / h,
  D_k = (m_k - m0) / r_k, rho solves R rho = b (R_ik = r_k^i, b from the phi recursion), and
  z_t = s_t / s0 z - a_t h phi_1 m0 - a_t B(h) sum_k rho_k D_k.
"""

from __future__ import annotations

import jax.numpy as jnp

VARIANTS = ("bh1", "bh2")


def coefficients(hh, order: int, variant: str = "bh2"):
    """(h phi_1, B(h), b) of the order conditions R rho = b (diffusers' recursion)."""
    h_phi_1 = jnp.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, jnp.stack(b)


def _differences(m0, lam0, h, older_m, older_lam):
    """Ratios r_k and divided differences D_k of the older data predictions."""
    rks = [(lam - lam0) / h for lam in older_lam]
    return rks, [(m - m0) / r for m, r in zip(older_m, rks)]


def _powers(rks):
    """R: row i holds r_k^i for every k (the last column is r = 1)."""
    r = jnp.stack(list(rks) + [jnp.ones_like(rks[0])])
    return jnp.stack([r**i for i in range(r.shape[0])])


def _weighted(rhos, ds):
    return sum(rho * d for rho, d in zip(rhos, ds))


def predict(z, m0, older_m, older_lam, lam0, s0, lam_t, a_t, s_t, order: int, variant: str = "bh2"):
    """UniP of ``order`` from (z, m0) at lambda0 to lambda_t, with the ``order - 1`` newest of
    ``older_m`` / ``older_lam`` (newest first)."""
    h = lam_t - lam0
    h_phi_1, b_h, b = coefficients(-h, order, variant)
    base = s_t / s0 * z - a_t * h_phi_1 * m0
    if order == 1:
        return base
    rks, ds = _differences(m0, lam0, h, older_m[: order - 1], older_lam[: order - 1])
    rhos = [0.5] if order == 2 else jnp.linalg.solve(_powers(rks)[:-1, :-1], b[:-1])
    return base - a_t * b_h * _weighted(rhos, ds)


def correct(z_prev, m0, m_t, older_m, older_lam, lam0, s0, lam_t, a_t, s_t, order: int, variant: str = "bh2"):
    """UniC of ``order``: the step from (z_prev, m0) at lambda0 to lambda_t again, now also using
    m_t, the data prediction at the point UniP reached."""
    h = lam_t - lam0
    h_phi_1, b_h, b = coefficients(-h, order, variant)
    base = s_t / s0 * z_prev - a_t * h_phi_1 * m0
    rks, ds = _differences(m0, lam0, h, older_m[: order - 1], older_lam[: order - 1])
    rhos = [0.5] if order == 1 else jnp.linalg.solve(_powers(rks), b)
    return base - a_t * b_h * (_weighted(rhos[:-1], ds) + rhos[-1] * (m_t - m0))


def step_order(index, num_steps: int, solver_order: int, lower_order_final: bool = True):
    """diffusers' order at step ``index`` (may be traced): warm-up from 1, and with
    ``lower_order_final`` no more than the steps left."""
    order = jnp.minimum(solver_order, index + 1)
    if lower_order_final:
        order = jnp.minimum(order, num_steps - index)
    return order
