"""Guided distillation, stage 2: progressive distillation conditioned on the guidance scale
(Salimans & Ho 2022; Meng et al. 2023).

An N-step student learns to do in one DDIM step what its teacher (the
2N-step model: the stage-1 student, then each previous student) does in
two. For unit times u = i / N (i = 1..N), u' = u - 1/(2N), u'' = u - 1/N:

    z_{t'}  = DDIM_teacher(z_t,  t  -> t')
    z_{t''} = DDIM_teacher(z_t', t' -> t'')
    x~ = (z_{t''} - (s_t'' / s_t) z_t) / (a_t'' - (s_t'' / s_t) a_t)

the x whose single DDIM step t -> t'' lands exactly on z_{t''}. On the
last step (t'' is the clean end) the target is the teacher's x_hat at t'.
Loss: truncated SNR, max(SNR_t, 1) ||x_student - x~||^2.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.diffusion import solvers
from jdistill.objectives.denoising import labels_cond, per_example_mse, x_space_weight
from jdistill.objectives.guided import sample_scales, with_guidance


def step_times(schedule, i, num_steps: int):
    """(t, t', t'') in the schedule's units for student step i of ``num_steps`` (i = 1 is the last)."""
    u = i.astype(jnp.float32) / num_steps
    return schedule.from_unit(u), schedule.from_unit(u - 0.5 / num_steps), schedule.from_unit(u - 1.0 / num_steps)


def two_step_target(teacher: Denoiser, z, t, t_mid, t_end, cond, is_last):
    """The x that makes one DDIM step t -> t_end equal the teacher's two steps t -> t_mid -> t_end."""
    a_t, s_t = teacher.alpha_sigma(t, z)
    a_m, s_m = teacher.alpha_sigma(t_mid, z)
    a_e, s_e = teacher.alpha_sigma(t_end, z)
    p1 = teacher.predict(z, t, cond)
    z_mid = solvers.ddim_step(p1.x0, p1.eps, a_t, s_t, a_m, s_m)
    p2 = teacher.predict(z_mid, t_mid, cond)
    z_end = solvers.ddim_step(p2.x0, p2.eps, a_m, s_m, a_e, s_e)
    ratio = s_e / s_t
    x_tilde = (z_end - ratio * z) / (a_e - ratio * a_t)
    return jnp.where(is_last.reshape((-1,) + (1,) * (z.ndim - 1)), p2.x0, x_tilde)


def progressive_loss(student: Denoiser, teacher: Denoiser, *, num_steps: int, scale_range=(1.0, 5.0),
                     cond_fn: Callable = labels_cond, weighting: str = "truncated_snr"):
    """``loss(params, frozen, batch, rng)`` for an ``num_steps``-step student; ``frozen`` is the
    2N-step teacher's params. ``scale_range=None`` distils a model with no guidance input."""

    def loss_fn(params, frozen, batch, rng):
        x = batch["image"]
        n = x.shape[0]
        k_i, k_eps, k_g = jax.random.split(rng, 3)
        i = jax.random.randint(k_i, (n,), 1, num_steps + 1)
        t, t_mid, t_end = step_times(student.schedule, i, num_steps)
        eps = jax.random.normal(k_eps, x.shape, x.dtype)
        a, s = student.alpha_sigma(t, x)
        z = a * x + s * eps
        cond = cond_fn(batch)
        if scale_range is not None:
            cond = with_guidance(cond, sample_scales(k_g, n, scale_range))
        target = jax.lax.stop_gradient(
            two_step_target(teacher.replace(params=frozen), z, t, t_mid, t_end, cond, i == 1))
        pred = student.replace(params=params).predict(z, t, cond).x0
        snr = (a / s).reshape(-1) ** 2
        mse = per_example_mse(pred, target)
        loss = jnp.mean(x_space_weight(weighting, "x0", snr, s.reshape(-1)) * mse)
        return loss, {"x_mse": jnp.mean(mse)}

    return loss_fn
