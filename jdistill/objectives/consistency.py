"""Consistency distillation (latent consistency models, Luo et al. 2023) over any teacher Denoiser.

    loss_fn = lcm_loss(student, teacher, num_steps=50, scale_range=(3.0, 13.0))
    loss, metrics = loss_fn(params, {"teacher": teacher_params, "target": target_params}, batch, rng)

One step of the objective, as diffusers' ``train_lcm_distill_sd_wds.py`` takes it:

1. a skip-grid step (``diffusion.consistency.skip_grid``: N = 50 teacher steps, k = T // N)
   with its start index uniform: start t, end s = t - k (clipped at 0);
2. z_t = a_t x + s_t eps;
3. a guidance scale g per example, uniform in ``scale_range`` (diffusers' scale; LCM's w = g - 1),
   given to the student as its guidance input (:func:`guidance_input`: LCM's ``timestep_cond``
   w embedding for SD UNets with ``time_cond_proj_dim``, the ``guidance`` embedder otherwise);
4. one teacher solver step t -> s with classifier-free guidance at g (:func:`teacher_step`:
   DDIM, or Heun's two calls);
5. loss = d(f_theta(z_t, t), stop_gradient(f_theta^-(z_s, s))), f = c_skip z + c_out x0_hat
   with the boundary scalings at timestep scaling 10, theta^- the target average *as it is in
   the train state now* (the engine evaluates ``inputs`` inside the jitted step), d the mean
   squared error or pseudo-Huber sqrt(d^2 + c^2) - c, elementwise then averaged.

eps, v, x0 and flow teachers alike: everything is read through the Denoiser's (x0, eps).
``scale_range=None`` distils without guidance (an unconditional teacher): one teacher pass,
no guidance input. The student starts as the teacher plus a zero-initialised guidance
embedding, so at step 0 it *is* the teacher's conditional model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.diffusion import solvers
from jdistill.diffusion.consistency import consistency_output, skip_grid
from jdistill.models import layers
from jdistill.models import registry as model_registry
from jdistill.objectives.denoising import labels_cond
from jdistill.objectives.guided import GUIDANCE_KEY, sample_scales

DISTANCES = ("l2", "huber")
TEACHER_SOLVERS = ("ddim", "heun")


def guidance_input(module, scale) -> dict:
    """How a student reads the guidance scale g (diffusers' convention): an SD UNet with
    ``time_cond_proj_dim`` as LCM's w embedding (``timestep_cond``, what diffusers'
    LatentConsistencyModelPipeline passes), any other network through its guidance embedder."""
    if model_registry.guidance_input_kind(module) == "timestep_cond":
        return {"timestep_cond": layers.guidance_scale_embedding(scale, int(module.time_cond_proj_dim))}
    return {GUIDANCE_KEY: jnp.asarray(scale, jnp.float32)}


def with_guidance_input(module, cond: dict, scale) -> dict:
    return cond if scale is None else {**cond, **guidance_input(module, scale)}


def sample_skip_steps(key, schedule, n: int, num_steps: int):
    """(start, end) native times of ``n`` skip-grid steps with their index uniform in 0..N-1."""
    starts, ends = skip_grid(schedule, num_steps)
    idx = jax.random.randint(key, (n,), 0, len(starts))
    return jnp.asarray(starts)[idx], jnp.asarray(ends)[idx]


def noised_skip_step(den: Denoiser, x, rng, num_steps: int, scale_range):
    """One draw of the objective: (z_t, t, s, g) with (t, s) a uniform skip-grid step, z_t = a_t x + s_t eps
    and g the per-example guidance scales (None without ``scale_range``)."""
    k_t, k_eps, k_g = jax.random.split(rng, 3)
    t, s = sample_skip_steps(k_t, den.schedule, x.shape[0], num_steps)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    a, sig = den.alpha_sigma(t, x)
    g = sample_scales(k_g, x.shape[0], scale_range) if scale_range is not None else None
    return a * x + sig * eps, t, s, g


def _expand(v, like):
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def teacher_step(teacher: Denoiser, z, t, s, cond=None, scale=None, uncond=None, solver: str = "ddim"):
    """The PF-ODE step t -> s (per example) of ``teacher`` with classifier-free guidance at ``scale``.

    "ddim": z_s = a_s x0_hat + s_s eps_hat (LCM's DDIMSolver). "heun": Heun's second-order step in
    x = z / a over sigma = s / a (diffusers' HeunDiscreteScheduler's), Euler where s is the clean end."""
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; expected one of {TEACHER_SOLVERS}")
    pred = teacher.predict(z, t, cond, guidance_scale=scale, uncond=uncond)
    (a_t, s_t), (a_s, s_s) = teacher.alpha_sigma(t, z), teacher.alpha_sigma(s, z)
    if solver == "ddim":
        return solvers.ddim_step(pred.x0, pred.eps, a_t, s_t, a_s, s_s)
    sig_t, sig_s = s_t / a_t, s_s / a_s
    slope = solvers.ve_slope(z, pred.x0, a_t, sig_t)
    z_euler = solvers.ve_euler(z, slope, a_t, sig_t, a_s, sig_s)
    at_end = teacher.predict(z_euler, s, cond, guidance_scale=scale, uncond=uncond)
    safe_sig_s = jnp.where(sig_s > 0, sig_s, 1.0)
    corrected = solvers.heun_correct(z, slope, solvers.ve_slope(z_euler, at_end.x0, a_s, safe_sig_s), a_t, sig_t,
                                     a_s, sig_s)
    return jnp.where(sig_s > 0, corrected, z_euler)


def consistency_distance(a, b, kind: str = "l2", huber_c: float = 0.001):
    """Mean over all elements of (a - b)^2 ("l2") or sqrt((a - b)^2 + c^2) - c ("huber"), in fp32."""
    d2 = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    if kind == "l2":
        return jnp.mean(d2)
    if kind == "huber":
        return jnp.mean(jnp.sqrt(d2 + huber_c**2) - huber_c)
    raise ValueError(f"unknown consistency distance {kind!r}; expected one of {DISTANCES}")


def check_options(distance: str, solver: str, num_steps: int) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"unknown consistency distance {distance!r}; expected one of {DISTANCES}")
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; expected one of {TEACHER_SOLVERS}")
    if int(num_steps) < 1:
        raise ValueError(f"the skip grid needs at least one step, got {num_steps}")


def consistency_pair(online: Denoiser, target: Denoiser, z, t, z_s, s, cond, timestep_scaling: float = 10.0):
    """(f_online(z_t, t), stop_gradient(f_target(z_s, s)), the online x0 prediction)."""
    schedule = online.schedule
    x0 = online.predict(z, t, cond).x0
    f_online = consistency_output(schedule, z, x0, t, timestep_scaling=timestep_scaling)
    f_target = consistency_output(schedule, z_s, target.predict(z_s, s, cond).x0, s,
                                  timestep_scaling=timestep_scaling)
    return f_online, jax.lax.stop_gradient(f_target), x0


def lcm_loss(student: Denoiser, teacher: Denoiser, *, num_steps: int = 50, scale_range=(3.0, 13.0),
             cond_fn: Callable | None = labels_cond, uncond_fn: Callable | None = None, solver: str = "ddim",
             distance: str = "l2", huber_c: float = 0.001, timestep_scaling: float = 10.0):
    """``loss(params, inputs, batch, rng)``; ``inputs``: {"teacher": the frozen teacher's params,
    "target": the target average theta^- as a full param tree}.

    ``cond_fn(batch)``: the teacher's condition; ``uncond_fn(batch)``: its unconditional input
    (default: the teacher's ``null_cond``). ``scale_range``: guidance scales g (None: no guidance).
    """
    check_options(distance, solver, num_steps)
    scale_range = tuple(scale_range) if scale_range is not None else None

    def loss_fn(params, inputs, batch, rng):
        z, t, s, g = noised_skip_step(teacher, batch["image"], rng, num_steps, scale_range)
        cond = cond_fn(batch) if cond_fn is not None else {}
        uncond = uncond_fn(batch) if uncond_fn is not None else None
        z_s = jax.lax.stop_gradient(
            teacher_step(teacher.replace(params=inputs["teacher"]), z, t, s, cond or None, g, uncond, solver))
        student_cond = with_guidance_input(student.module, cond, g) or None
        f_online, f_target, _ = consistency_pair(student.replace(params=params),
                                                 student.replace(params=inputs["target"]), z, t, z_s, s,
                                                 student_cond, timestep_scaling)
        loss = consistency_distance(f_online, f_target, distance, huber_c)
        return loss, {"consistency": loss}

    return loss_fn


__all__ = ["DISTANCES", "TEACHER_SOLVERS", "consistency_distance", "consistency_pair", "guidance_input",
           "lcm_loss", "noised_skip_step", "sample_skip_steps", "teacher_step", "with_guidance_input"]
