"""LADD: latent adversarial diffusion distillation (Sauer et al., arXiv 2403.12015).

A student initialised from a rectified-flow teacher takes one step from z_t to x_hat, with
t drawn from a short list ({1, 0.75, 0.5, 0.25} with probabilities [0.7, 0.1, 0.1, 0.1]) and
z_t = a_t x + s_t eps made from teacher-generated (synthetic) data x. The discriminator is
the frozen teacher as feature network: real x and fake x_hat are re-noised, each to its own
t_hat ~ logit-normal(m, s), the teacher's tokens at the tapped blocks go through trainable
heads (``models/discriminator.py``), one logit per position.

    L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]        (hinge; the paper)
    L_G = -E[D(fake)]                                        (hinge generator loss)

or, with ``loss="non_saturating"`` (FastGen's softplus form), L_D = E[softplus(-D(real))] +
E[softplus(D(fake))] and L_G = E[softplus(-D(fake))]. The generator's gradient reaches x_hat
through the frozen teacher's blocks; the teacher's params are read under stop_gradient and
never differentiated. The discriminator's loss reads x_hat under stop_gradient (no gradient
to the generator); the generator's reads the heads under stop_gradient.

Options, off by default: FastGen's approximate R1, ``r1_weight`` E[(D(real) - D(real +
r1_sigma n))^2] on the re-noised real input; ADD's distillation term ``distill_weight`` E[(x_hat
- sg(x_teacher^g(renoise(sg(x_hat), t), t)))^2], the teacher with CFG scale
``distill_guidance`` at t ~ U(0, 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdistill.denoiser import Denoiser
from jdistill.objectives.denoising import labels_cond, logit_normal, per_example_mse

LOSSES = ("hinge", "non_saturating")
sg = jax.lax.stop_gradient


def discriminator_loss(real_logits, fake_logits, kind: str = "hinge"):
    """The discriminator's loss on the logits of real and fake samples (every position averaged)."""
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
    raise ValueError(f"unknown adversarial loss {kind!r}; expected one of {LOSSES}")


def generator_loss(fake_logits, kind: str = "hinge"):
    if kind == "hinge":
        return -jnp.mean(fake_logits)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake_logits))
    raise ValueError(f"unknown adversarial loss {kind!r}; expected one of {LOSSES}")


def student_times(key, n: int, times, probs):
    """n student times drawn from the list ``times`` with probabilities ``probs``."""
    times, probs = jnp.asarray(times, jnp.float32), jnp.asarray(probs, jnp.float32)
    return jax.random.choice(key, times, (n,), p=probs / jnp.sum(probs))


def discriminator_cond(cond: dict) -> dict:
    """What the heads are conditioned on, read off the network's condition: the class labels or
    SD3's pooled text embedding."""
    return {"class_labels": cond.get("class_labels"), "pooled": cond.get("pooled_projections")}


def _concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


@dataclasses.dataclass(frozen=True)
class LADD:
    """The two losses of one LADD setup. ``student`` / ``teacher``: Denoiser templates (params come
    in as arguments); ``discriminator``: the heads module reading ``blocks`` of the teacher."""

    student: Denoiser
    teacher: Denoiser
    discriminator: Any
    blocks: tuple[str, ...]
    cond_fn: Callable = labels_cond  # batch -> the networks' condition
    uncond_fn: Callable | None = None  # batch -> the teacher's unconditional input (distillation term)
    loss: str = "hinge"
    times: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    time_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    renoise_mean: float = 1.0
    renoise_std: float = 1.0
    r1_weight: float = 0.0
    r1_sigma: float = 0.1
    distill_weight: float = 0.0
    distill_guidance: float = 1.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown adversarial loss {self.loss!r}; expected one of {LOSSES}")
        if len(self.times) != len(self.time_probs):
            raise ValueError(f"{len(self.times)} student times but {len(self.time_probs)} probabilities")

    # -- pieces --------------------------------------------------------------------------
    def fake(self, student_params, x, cond, key):
        """(x_hat, t): one student step from z_t, z_t made from the data x at a drawn student time."""
        k_t, k_eps = jax.random.split(key)
        t = student_times(k_t, x.shape[0], self.times, self.time_probs)
        a, s = self.student.alpha_sigma(t, x)
        z = a * x + s * jax.random.normal(k_eps, x.shape, x.dtype)
        return self.student.replace(params=student_params).predict(z, t, cond).x0, t

    def renoise(self, x, key):
        """(z_hat, t_hat): x re-noised to t_hat ~ logit-normal(renoise_mean, renoise_std)."""
        k_t, k_eps = jax.random.split(key)
        t = logit_normal(k_t, x.shape[0], self.renoise_mean, self.renoise_std)
        a, s = self.teacher.alpha_sigma(t, x)
        return a * x + s * jax.random.normal(k_eps, x.shape, x.dtype), t

    def logits(self, d_params, teacher_params, z, t, cond):
        """The heads' logits (B, N) on the frozen teacher's tapped tokens at (z, t)."""
        feats = self.teacher.replace(params=sg(teacher_params)).features(z, t, cond, blocks=self.blocks)
        return self.discriminator.apply({"params": d_params}, feats, self.teacher.schedule.model_time(t),
                                        **discriminator_cond(cond))

    # -- the discriminator's update: inputs = (student params, teacher params) -------------
    def d_loss(self, d_params, inputs, batch, rng):
        student_params, teacher_params = inputs
        x, cond = batch["image"], self.cond_fn(batch)
        k_fake, k_real, k_renoise_fake, k_r1 = jax.random.split(rng, 4)
        x_hat = sg(self.fake(sg(student_params), x, cond, k_fake)[0])
        z_real, t_real = self.renoise(x, k_real)
        z_fake, t_fake = self.renoise(x_hat, k_renoise_fake)
        both = self.logits(d_params, teacher_params, jnp.concatenate([z_real, z_fake]),
                           jnp.concatenate([t_real, t_fake]), _concat(cond, cond))
        real, fake = jnp.split(both, 2, axis=0)
        loss = discriminator_loss(real, fake, self.loss)
        metrics = {"adv": loss, "real_logit": jnp.mean(real), "fake_logit": jnp.mean(fake),
                   "real_correct": jnp.mean(real > 0), "fake_correct": jnp.mean(fake < 0)}
        if self.r1_weight:
            noisy = z_real + self.r1_sigma * jax.random.normal(k_r1, z_real.shape, z_real.dtype)
            r1 = jnp.mean(jnp.square(real - self.logits(d_params, teacher_params, noisy, t_real, cond)))
            loss = loss + self.r1_weight * r1
            metrics["r1"] = r1
        return loss, metrics

    # -- the generator's update: inputs = (discriminator params, teacher params) -----------
    def g_loss(self, student_params, inputs, batch, rng):
        d_params, teacher_params = inputs
        x, cond = batch["image"], self.cond_fn(batch)
        k_fake, k_renoise, k_distill = jax.random.split(rng, 3)
        x_hat, _ = self.fake(student_params, x, cond, k_fake)
        z_fake, t_fake = self.renoise(x_hat, k_renoise)
        fake = self.logits(sg(d_params), teacher_params, z_fake, t_fake, cond)
        adv = generator_loss(fake, self.loss)
        loss, metrics = adv, {"adv": adv, "fake_logit": jnp.mean(fake)}
        if self.distill_weight:
            distill = jnp.mean(per_example_mse(x_hat, self.distill_target(teacher_params, x_hat, batch, cond,
                                                                          k_distill)))
            loss = loss + self.distill_weight * distill
            metrics["distill"] = distill
        return loss, metrics

    def distill_target(self, teacher_params, x_hat, batch, cond, key):
        """ADD's distillation target: the teacher's CFG x0 of sg(x_hat) re-noised to t ~ U(0, 1)."""
        k_t, k_eps = jax.random.split(key)
        t = jax.random.uniform(k_t, (x_hat.shape[0],), minval=1e-3, maxval=1.0 - 1e-3)
        a, s = self.teacher.alpha_sigma(t, x_hat)
        z = a * sg(x_hat) + s * jax.random.normal(k_eps, x_hat.shape, x_hat.dtype)
        uncond = self.uncond_fn(batch) if self.uncond_fn is not None else None
        g = None if self.distill_guidance == 1.0 else self.distill_guidance
        teacher = self.teacher.replace(params=sg(teacher_params))
        return sg(teacher.predict(z, t, cond, guidance_scale=g, uncond=uncond).x0)
