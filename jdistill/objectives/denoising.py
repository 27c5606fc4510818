"""Teacher training: the denoising loss.

    loss_fn = denoising_loss(template, weighting="truncated_snr", cond_drop_prob=0.1, cond_fn=labels_cond)
    loss, metrics = loss_fn(params, None, batch, rng)

``template`` is a Denoiser whose params are replaced by the ones being
trained; it fixes the schedule, what the network predicts (the regression
target: eps, v, x0 or flow velocity) and how to drop the condition for
classifier-free guidance (its ``null_cond``).

Weightings are defined on the x-space error ||x_hat - x||^2, which makes
them comparable across targets (Salimans & Ho; Hang et al.):

* "constant": plain MSE on the target itself (eps-MSE for eps, ...);
* "truncated_snr": max(SNR, 1) ||x_hat - x||^2 (Salimans & Ho, used by Meng et al.);
* "min_snr": min(SNR, gamma) ||x_hat - x||^2 (Hang et al., gamma = 5).

The loss is computed on the target (never by dividing through x), with the
x-space weight converted by the target's own scale: eps-MSE = SNR x-MSE,
v-MSE = (SNR + 1) x-MSE, flow-MSE = x-MSE / s^2.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.diffusion import parameterization as param_lib
from jdistill.diffusion.schedules import DiscreteVP, RectifiedFlow, shift_time

WEIGHTINGS = ("constant", "truncated_snr", "min_snr")


def target_scale(kind: str, snr, s):
    """c with ||target_hat - target||^2 = c ||x_hat - x||^2 at this noise level."""
    if kind == "eps":
        return snr
    if kind == "v":
        return snr + 1.0
    if kind == "x0":
        return jnp.ones_like(snr)
    if kind == "flow":
        return 1.0 / (s * s)
    raise ValueError(kind)


def x_space_weight(weighting: str, kind: str, snr, s, gamma: float = 5.0):
    if weighting == "constant":
        return target_scale(kind, snr, s)
    if weighting == "truncated_snr":
        return jnp.maximum(snr, 1.0)
    if weighting == "min_snr":
        return jnp.minimum(snr, gamma)
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")


def logit_normal(key, n: int, mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(m + s N(0, 1)) in (0, 1): SD3's training times, LADD's re-noising levels."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


def sample_times(key, schedule, n: int, sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
    """Training times in the schedule's units: integers for discrete schedules, (0, 1) otherwise.

    Flow schedules use "logit_normal" (SD3) or "uniform", then the schedule's shift."""
    if isinstance(schedule, DiscreteVP):
        return jax.random.randint(key, (n,), 0, schedule.num_train_timesteps)
    if sampling == "uniform":
        t = jax.random.uniform(key, (n,), minval=1e-5, maxval=1.0 - 1e-5)
    elif sampling == "logit_normal":
        t = logit_normal(key, n, logit_mean, logit_std)
    else:
        raise ValueError(f"unknown time sampling {sampling!r}; expected uniform or logit_normal")
    if isinstance(schedule, RectifiedFlow) and schedule.shift != 1.0:
        t = shift_time(t, schedule.shift)
    return t


def drop_condition(key, cond: dict, null_cond: Callable, prob: float) -> dict:
    """Replace each example's condition by the null condition with probability ``prob`` (CFG training)."""
    if prob <= 0 or not cond:
        return cond
    null = null_cond(cond)
    drop = jax.random.bernoulli(key, prob, (jax.tree.leaves(cond)[0].shape[0],))

    def pick(c, u):
        return jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), u, c)

    return jax.tree.map(pick, cond, null)


def per_example_mse(a, b):
    """Mean squared error over all but the batch axis, in fp32."""
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=tuple(range(1, a.ndim)))


def labels_cond(batch) -> dict:
    """Class-conditional models: the batch's labels as the module's ``class_labels``."""
    return {"class_labels": batch["label"]}


def denoising_loss(template: Denoiser, *, weighting: str = "constant", min_snr_gamma: float = 5.0,
                   cond_fn: Callable | None = labels_cond, cond_drop_prob: float = 0.0,
                   time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
    """Build ``loss(params, frozen, batch, rng) -> (loss, metrics)`` for teacher training."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if cond_drop_prob > 0 and template.null_cond is None:
        raise ValueError("cond_drop_prob > 0 needs a Denoiser with null_cond (what the dropped condition becomes)")
    kind = template.prediction

    def loss_fn(params, frozen, batch, rng):
        del frozen
        x = batch["image"]
        k_t, k_eps, k_drop = jax.random.split(rng, 3)
        t = sample_times(k_t, template.schedule, x.shape[0], time_sampling, logit_mean, logit_std)
        eps = jax.random.normal(k_eps, x.shape, x.dtype)
        den = template.replace(params=params)
        a, s = den.alpha_sigma(t, x)
        z = a * x + s * eps
        cond = cond_fn(batch) if cond_fn is not None else {}
        cond = drop_condition(k_drop, cond, template.null_cond, cond_drop_prob) if cond_drop_prob else cond
        out = den.output(z, t, cond)
        if template.learned_variance:
            out = out[..., : x.shape[-1]]
        target = param_lib.from_x0_eps(x, eps, a, s, kind)
        mse = per_example_mse(out, target)
        snr = (a / s).reshape(-1) ** 2
        s_flat = s.reshape(-1)
        weight = x_space_weight(weighting, kind, snr, s_flat, min_snr_gamma) / target_scale(kind, snr, s_flat)
        loss = jnp.mean(weight * mse)
        return loss, {"mse": jnp.mean(mse)}

    return loss_fn


__all__ = ["denoising_loss", "drop_condition", "labels_cond", "logit_normal", "per_example_mse", "sample_times", "target_scale",
           "x_space_weight", "WEIGHTINGS"]
