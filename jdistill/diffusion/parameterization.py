"""Exact conversions between what a network predicts and (x0, eps).

With z = a x + s eps:
  eps      -> x = (z - s eps) / a
  v        -> v = a eps - s x,  x = a z - s v,  eps = s z + a v   (a^2 + s^2 = 1)
  x0       -> eps = (z - a x) / s
  flow     -> u = eps - x,      x = z - s u,    eps = z + a u     (a + s = 1)

``a`` and ``s`` broadcast against the image (shape (B, 1, 1, 1) or scalars).
"""

from __future__ import annotations

PREDICTIONS = ("eps", "v", "x0", "flow")

# diffusers' names for the same things
DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def check_prediction(kind: str) -> str:
    kind = DIFFUSERS_PREDICTION.get(kind, kind)
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTIONS} (or diffusers' names)")
    return kind


def to_x0_eps(out, z, a, s, kind: str):
    """(x0, eps) implied by a network output of the given kind at z = a x + s eps."""
    if kind == "eps":
        return (z - s * out) / a, out
    if kind == "v":
        return a * z - s * out, s * z + a * out
    if kind == "x0":
        return out, (z - a * out) / s
    if kind == "flow":
        return z - s * out, z + a * out
    raise ValueError(f"unknown prediction type {kind!r}")


def from_x0_eps(x0, eps, a, s, kind: str):
    """The network output of the given kind that corresponds to (x0, eps)."""
    if kind == "eps":
        return eps
    if kind == "v":
        return a * eps - s * x0
    if kind == "x0":
        return x0
    if kind == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction type {kind!r}")


def eps_from_x0(z, x0, a, s):
    return (z - a * x0) / s


def x0_from_eps(z, eps, a, s):
    return (z - s * eps) / a
