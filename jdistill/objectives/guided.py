"""Guided distillation, stage 1 (Meng et al., CVPR 2023): one network for every guidance weight.

The student has the teacher's architecture plus a guidance embedding (zero-
initialised, so at step 0 it is the teacher's conditional model) and learns
to output, in one pass, what the teacher gives with classifier-free
guidance (two passes):

    L = E_{x, t, eps, g} [ w(lambda_t) || x_student(z_t, t, c, g) - x_teacher^g(z_t, t, c) ||^2 ]

with g ~ U[g_min, g_max]. jdistill's guidance convention is diffusers'
scale g; Meng et al.'s w is g - 1, so their pixel-space range w in [0, 4]
is ``scale_range=(1, 5)``. The student reads g under the condition key
``guidance``. The target is computed under ``stop_gradient`` with the
frozen teacher params (``frozen``), never the student's.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.objectives.denoising import labels_cond, per_example_mse, sample_times, x_space_weight

GUIDANCE_KEY = "guidance"


def sample_scales(key, n: int, scale_range: tuple[float, float]):
    lo, hi = scale_range
    return jax.random.uniform(key, (n,), minval=lo, maxval=hi)


def with_guidance(cond: dict, scale) -> dict:
    """The student's condition: the teacher's plus the guidance scale it should imitate."""
    return {**cond, GUIDANCE_KEY: scale}


def guided_loss(student: Denoiser, teacher: Denoiser, *, scale_range=(1.0, 5.0), cond_fn: Callable = labels_cond,
                uncond_fn: Callable | None = None, weighting: str = "truncated_snr", time_sampling: str = "uniform"):
    """``loss(params, frozen, batch, rng)``; ``frozen`` is the teacher's params.

    ``cond_fn(batch)`` gives the network's condition; the teacher's unconditional input is
    ``uncond_fn(batch)`` when given (text: the empty prompt's embeddings), else the
    teacher's ``null_cond`` (class labels: the null class).
    """

    def loss_fn(params, frozen, batch, rng):
        x = batch["image"]
        k_t, k_eps, k_g = jax.random.split(rng, 3)
        t = sample_times(k_t, student.schedule, x.shape[0], time_sampling)
        eps = jax.random.normal(k_eps, x.shape, x.dtype)
        a, s = student.alpha_sigma(t, x)
        z = a * x + s * eps
        g = sample_scales(k_g, x.shape[0], scale_range)
        cond = cond_fn(batch)
        uncond = uncond_fn(batch) if uncond_fn is not None else None
        target = jax.lax.stop_gradient(
            teacher.replace(params=frozen).predict(z, t, cond, guidance_scale=g, uncond=uncond).x0)
        pred = student.replace(params=params).predict(z, t, with_guidance(cond, g)).x0
        snr = (a / s).reshape(-1) ** 2
        mse = per_example_mse(pred, target)
        loss = jnp.mean(x_space_weight(weighting, "x0", snr, s.reshape(-1)) * mse)
        return loss, {"x_mse": jnp.mean(mse)}

    return loss_fn
