"""CoDi (Mei et al., CVPR 2024): one-stage distillation of a diffusion prior into a few-step
conditional sampler.

    loss_fn = codi_loss(model, teacher, cond_fn=..., guidance_weight=1.0)
    loss, metrics = loss_fn(params, {"target": theta_minus, "teacher": teacher_params}, batch, rng)

The model is the prior's backbone with an adapter that reads the condition image c
(``jdistill.models.adapters``; at step 0 it is the prior). One step:

1. a skip-grid step t -> s (as LCM: ``objectives.consistency``), z_t = a_t x + s_t eps;
2. the PF-ODE step z_t -> z_s taken by the conditional model itself (``ode="model"``: the paper's
   choice), read at the target params theta^- as they are in the train state now, with classifier-
   free guidance of a text / class condition at g when ``scale_range`` is set (the image condition
   stays on both sides); ``ode="teacher"`` is the released code's variant, the frozen unconditional
   prior taking the step;
3. loss = d(f_theta(z_t, t, c), stop_gradient(f_theta^-(z_s, s, c)))
          + lambda ||x_hat_theta(z_t, t, c) - x||^2,
   the second term (the paper's conditional guidance, in the model's space: latents for latent
   models) the online x0 prediction's squared error, averaged over elements.

Full CoDi trains backbone and adapter; PE-CoDi freezes the backbone through the engine's
trainable mask (``models.adapters.adapter_mask``): the loss is the same.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.objectives.consistency import (check_options, consistency_distance, consistency_pair,
                                             noised_skip_step, teacher_step, with_guidance_input)

ODE_MODELS = ("model", "teacher")


def codi_loss(model: Denoiser, teacher: Denoiser | None = None, *, cond_fn: Callable, uncond_fn: Callable | None = None,
              teacher_cond_fn: Callable | None = None, teacher_uncond_fn: Callable | None = None,
              num_steps: int = 50, scale_range=None, guidance_weight: float = 1.0, ode: str = "model",
              solver: str = "ddim", distance: str = "l2", huber_c: float = 0.001, timestep_scaling: float = 10.0):
    """``loss(params, inputs, batch, rng)``; ``inputs``: {"target": theta^- (full tree), "teacher": the prior's
    params (read with ``ode="teacher"``)}.

    ``cond_fn(batch)``: the model's condition (the image ``condition`` and the backbone's own inputs);
    ``uncond_fn(batch)``: its unconditional input for guidance (the image condition kept). With
    ``ode="teacher"``: ``teacher_cond_fn`` / ``teacher_uncond_fn`` make the prior's (no image condition).
    """
    check_options(distance, solver, num_steps)
    if ode not in ODE_MODELS:
        raise ValueError(f"unknown CoDi ODE model {ode!r}; expected one of {ODE_MODELS}")
    if ode == "teacher" and (teacher is None or teacher_cond_fn is None):
        raise ValueError("ode='teacher' needs the teacher Denoiser and its teacher_cond_fn")
    scale_range = tuple(scale_range) if scale_range is not None else None

    def loss_fn(params, inputs, batch, rng):
        x = batch["image"]
        z, t, s, g = noised_skip_step(model, x, rng, num_steps, scale_range)
        cond = with_guidance_input(model.module, cond_fn(batch), g)
        target = model.replace(params=inputs["target"])
        if ode == "model":
            uncond = with_guidance_input(model.module, uncond_fn(batch), g) if g is not None and uncond_fn else None
            stepper, step_cond = target, cond
        else:
            uncond = teacher_uncond_fn(batch) if g is not None and teacher_uncond_fn else None
            stepper, step_cond = teacher.replace(params=inputs["teacher"]), teacher_cond_fn(batch)
        z_s = jax.lax.stop_gradient(teacher_step(stepper, z, t, s, step_cond, g, uncond, solver))
        f_online, f_target, x0 = consistency_pair(model.replace(params=params), target, z, t, z_s, s, cond,
                                                  timestep_scaling)
        consistency = consistency_distance(f_online, f_target, distance, huber_c)
        reconstruction = jnp.mean(jnp.square(x0.astype(jnp.float32) - x.astype(jnp.float32)))
        loss = consistency + guidance_weight * reconstruction
        return loss, {"consistency": consistency, "x_mse": reconstruction}

    return loss_fn


__all__ = ["ODE_MODELS", "codi_loss"]
