"""The one interface every sampler and objective speaks.

A :class:`Denoiser` binds a network (a Flax module and its params) to the
meaning of its output: the noise schedule and time units it was trained
with, what it predicts (eps / v / x0 / flow velocity), whether it also
outputs a learned variance, and how to make its unconditional input for
classifier-free guidance. It answers, at (z_t, t, cond), the pair
(x0, eps) from which every other parameterisation follows.

Images are NHWC. ``t`` is in the schedule's native units (see
``jdistill.diffusion.schedules``); the network receives
``schedule.model_time(t)``. ``cond`` is a dict of keyword arguments for the
module (``{"class_labels": y}``, ``{"encoder_hidden_states": e}``, ...).

A Denoiser is a pytree whose only leaves are its params and schedule
tables, so ``jax.jit(f)(denoiser, ...)`` traces it like any array and
compiles once per (module, prediction type, ...) combination.

Build one with :meth:`Denoiser.for_module`: it reads off the module, the same way for
every family, whether it predicts a variance, how many real classes it has and
which label is its null class. :meth:`Denoiser.features` returns the intermediate
tokens / feature maps of the network's blocks (DiT and MMDiT ``block_{i}``, UNet
``down_{i}`` / ``mid`` / ``up_{i}``), differentiable in z, for discriminators and
oracles. A composite network (a backbone with an adapter) is one Flax module and so
one Denoiser (``jdistill.models.controlled_unet``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jdistill.diffusion import guidance as guidance_lib
from jdistill.diffusion import parameterization as param_lib
from jdistill.errors import InvalidArgument
from jdistill.models import registry


@struct.dataclass
class Prediction:
    """What a denoiser says about z_t: the clean sample, the noise, and (optionally)
    the raw learned-variance channels in [-1, 1] (improved DDPM / DiT)."""

    x0: jax.Array
    eps: jax.Array
    variance: jax.Array | None = None

    def v(self, a, s):
        return a * self.eps - s * self.x0

    def velocity(self):
        """Rectified-flow velocity u = eps - x0 (dz/dt for z_t = (1 - t) x + t eps)."""
        return self.eps - self.x0


@dataclasses.dataclass(frozen=True)
class NullClass:
    """Unconditional input for class-conditional models: every label becomes ``null_id``
    (DiT's label table has ``num_classes + 1`` rows, the last one the null class)."""

    null_id: int
    key: str = "class_labels"

    def __call__(self, cond):
        out = dict(cond)
        out[self.key] = jnp.full_like(cond[self.key], self.null_id)
        return out


def _concat(a, b):
    return jnp.concatenate([a, b], axis=0)


def _expand(x, like):
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


@struct.dataclass
class Denoiser:
    params: Any
    schedule: Any
    module: Any = struct.field(pytree_node=False)
    prediction: str = struct.field(pytree_node=False, default="eps")
    learned_variance: bool = struct.field(pytree_node=False, default=False)
    null_cond: Callable | None = struct.field(pytree_node=False, default=None)
    # Guide only the first k output channels; the original DiT code guides 3 of
    # its 4 latent channels (a quirk kept for exact reproduction, off by default).
    guided_channels: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        object.__setattr__(self, "prediction", param_lib.check_prediction(self.prediction))

    @classmethod
    def for_module(cls, module, schedule, prediction: str, params=None, *, guided_channels: int | None = None):
        """The Denoiser of ``module``: learned variance (2x the input channels out) and the null
        class of class-conditional models read off the module (``registry.class_conditioning``)."""
        classes = registry.class_conditioning(module)
        null = NullClass(classes.null_id) if classes is not None and classes.null_id is not None else None
        return cls(params=params, schedule=schedule, module=module, prediction=prediction,
                   learned_variance=registry.learned_variance(module), null_cond=null,
                   guided_channels=guided_channels or None)

    @property
    def num_classes(self) -> int | None:
        """Real classes of a class-conditional network (its null row excluded), else None."""
        classes = registry.class_conditioning(self.module)
        return classes.num_classes if classes is not None else None

    def output(self, z, t, cond=None):
        """The raw network output at (z, t) for the given conditioning."""
        t = jnp.broadcast_to(jnp.asarray(t), z.shape[:1])
        return self.module.apply({"params": self.params}, z, self.schedule.model_time(t), **(cond or {}))

    def guided_output(self, z, t, cond=None, guidance_scale=None, uncond=None):
        """Raw output with classifier-free guidance (diffusers' scale; see guidance.py).

        ``guidance_scale=None`` (or the Python number 1) runs one conditional pass.
        Otherwise cond and uncond run as one batch of 2B, as diffusers does.
        """
        if guidance_scale is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1):
            return self.output(z, t, cond)
        if uncond is None:
            if self.null_cond is None:
                raise ValueError("guidance needs `uncond` or a Denoiser built with `null_cond`")
            uncond = self.null_cond(cond)
        t = jnp.broadcast_to(jnp.asarray(t), z.shape[:1])
        both = self.output(_concat(z, z), _concat(t, t), jax.tree.map(_concat, cond, uncond))
        out_c, out_u = jnp.split(both, 2, axis=0)
        k = self.guided_channels or (z.shape[-1] if self.learned_variance else out_c.shape[-1])
        guided = guidance_lib.cfg(out_c[..., :k], out_u[..., :k], guidance_scale)
        return jnp.concatenate([guided, out_c[..., k:]], axis=-1) if k < out_c.shape[-1] else guided

    def predict(self, z, t, cond=None, guidance_scale=None, uncond=None, alpha_sigma=None) -> Prediction:
        """(x0, eps) at (z, t). ``alpha_sigma``: the (a, s) to read the output at, where a sampling
        grid's noise level is not the schedule's at t (Karras sigmas); default the schedule's."""
        out = self.guided_output(z, t, cond, guidance_scale, uncond)
        variance = None
        if self.learned_variance:
            out, variance = out[..., : z.shape[-1]], out[..., z.shape[-1]:]
        a, s = self.alpha_sigma(t, z) if alpha_sigma is None else alpha_sigma
        x0, eps = param_lib.to_x0_eps(out, z, a, s, self.prediction)
        return Prediction(x0=x0, eps=eps, variance=variance)

    def alpha_sigma(self, t, like):
        a, s = self.schedule.alpha_sigma(t)
        return _expand(a, like), _expand(s, like)

    def variances(self, t, like):
        a2, s2 = self.schedule.variances(t)
        return _expand(a2, like), _expand(s2, like)

    def x0(self, z, t, cond=None, **kw):
        return self.predict(z, t, cond, **kw).x0

    def eps(self, z, t, cond=None, **kw):
        return self.predict(z, t, cond, **kw).eps

    def v(self, z, t, cond=None, **kw):
        a, s = self.alpha_sigma(t, z)
        return self.predict(z, t, cond, **kw).v(a, s)

    def velocity(self, z, t, cond=None, **kw):
        return self.predict(z, t, cond, **kw).velocity()

    def replace_params(self, params) -> "Denoiser":
        return self.replace(params=params)

    def features(self, z, t, cond=None, blocks=None) -> dict[str, jax.Array]:
        """Intermediate block outputs at (z_t, t): ``{name: tokens (B, T, D) or maps (B, H, W, C)}``.

        ``blocks``: names (``"block_3"``, ``"down_1"``, ``"mid"``) or DiT / MMDiT block indices;
        None gives every block the network sows. Differentiable in ``z`` and the params.
        """
        t = jnp.broadcast_to(jnp.asarray(t), z.shape[:1])
        _, state = self.module.apply({"params": self.params}, z, self.schedule.model_time(t), **(cond or {}),
                                     mutable=["intermediates"])
        sown = _flatten_sown(state.get("intermediates", {}))
        if blocks is None:
            return sown
        out = {}
        for b in blocks:
            name = f"block_{b}" if isinstance(b, int) else str(b)
            if name not in sown:
                raise InvalidArgument(f"{type(self.module).__name__} has no block {name!r}; it sows {sorted(sown)}")
            out[name] = sown[name]
        return out


def _flatten_sown(tree, prefix="") -> dict:
    """{name: value} of sown intermediates; a composite's inner modules keep their path ("unet/down_0")."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, tuple):
            out[prefix + key] = value[0]
        else:
            out.update(_flatten_sown(value, f"{prefix}{key}/"))
    return out
