"""Optimizers and learning-rate schedules, one per trainable part.

Every part of a train state (a student, a discriminator, an adapter) gets its own
optax transformation from a config section like

    optim = dict(lr=1e-4, warmup=500, decay="linear", end_factor=0.0, b1=0.9, b2=0.999,
                 weight_decay=0.0, clip_norm=1.0)

Which params a part trains is not the optimizer's business: the engine splits the
frozen ones off before differentiating (``jdistill.train.engine.Part.trainable``), so they
get neither gradients nor optimizer moments.
"""

from __future__ import annotations

import optax

from jdistill.errors import UserError

DECAYS = ("constant", "linear", "cosine")


def learning_rate_schedule(lr: float, steps: int, warmup: int = 0, decay: str = "constant", end_factor: float = 0.0):
    """Linear warmup into constant, linear or cosine decay (optax schedules)."""
    if decay == "constant":
        main = optax.constant_schedule(lr)
    elif decay == "linear":
        main = optax.linear_schedule(lr, lr * end_factor, max(steps - warmup, 1))
    elif decay == "cosine":
        main = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=end_factor)
    else:
        raise UserError(f"unknown lr decay {decay!r}; expected one of {DECAYS}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(lr: float, steps: int, *, warmup: int = 0, decay: str = "constant", end_factor: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0):
    """AdamW behind global-norm clipping; returns (optimizer, lr schedule)."""
    if not lr > 0:
        raise UserError(f"learning rate must be > 0, got {lr}")
    if warmup < 0:
        raise UserError(f"warmup must be >= 0 steps, got {warmup}")
    schedule = learning_rate_schedule(lr, steps, warmup, decay, end_factor)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*chain), schedule


def from_config(optim_cfg, steps: int):
    """(optimizer, lr schedule) from an ``optim`` config section (see the module docstring)."""
    return make_optimizer(
        float(optim_cfg["lr"]), steps, warmup=int(optim_cfg.get("warmup", 0)),
        decay=optim_cfg.get("decay", "constant"), end_factor=float(optim_cfg.get("end_factor", 0.0)),
        b1=float(optim_cfg.get("b1", 0.9)), b2=float(optim_cfg.get("b2", 0.999)),
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)), clip_norm=optim_cfg.get("clip_norm", 1.0))
