"""Classifier-free guidance, with one convention for the whole library.

jdistill's convention is diffusers' ``guidance_scale`` g:

    guided = uncond + g * (cond - uncond)

g = 1 is the plain conditional model, g = 0 the unconditional one.
Meng et al. (guided distillation) write x_w = (1 + w) x_c - w x_u, so
g = 1 + w; the two helpers below are the only place that offset lives.

Because the weights (1 - g, g) sum to one, guiding eps, v, x0 or a flow
velocity gives the same sample: guide whichever the network outputs.
"""

from __future__ import annotations

import jax.numpy as jnp


def cfg(cond, uncond, scale):
    """uncond + scale * (cond - uncond); ``scale`` may be a scalar or per-example (B,)."""
    scale = jnp.asarray(scale, cond.dtype)
    if scale.ndim == 1:
        scale = scale.reshape((-1,) + (1,) * (cond.ndim - 1))
    return uncond + scale * (cond - uncond)


def scale_from_meng_w(w):
    """Meng et al.'s guidance weight w -> guidance_scale g = 1 + w."""
    return 1.0 + w


def meng_w_from_scale(scale):
    """guidance_scale g -> Meng et al.'s guidance weight w = g - 1."""
    return scale - 1.0
