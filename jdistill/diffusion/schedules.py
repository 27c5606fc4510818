"""Noise schedules: where a time value sits on the forward process.

Every schedule answers ``alpha_sigma(t) -> (a_t, s_t)`` with
``z_t = a_t * x + s_t * eps`` in its own *native* time units, and
``model_time(t)``, the number the network was trained to see:

* ``DiscreteVP``: integer timesteps 0..T-1 as diffusers / DiT count them
  (t = -1 stands for the clean sample, alpha_bar = 1). Non-integer t
  interpolates log alpha_bar, exact at the integers.
* ``CosineVP``: continuous t in [0, 1] with a clipped cosine logSNR
  (Salimans & Ho, Meng et al.). The network sees 1000 t.
* ``RectifiedFlow``: t = sigma in [0, 1], z_t = (1 - t) x + t eps
  (SD3). The network sees 1000 t. ``shift`` warps sampling and training
  times as SD3 does: t' = S t / (1 + (S - 1) t).

Schedules are pytrees (their tables are leaves), so a Denoiser holding one
can be passed through ``jax.jit``.
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdistill.diffusion.diffusers_options import UnsupportedSchedulerOption, refuse_plain_violations, zero_snr_floor

Array = jax.Array


class Schedule(Protocol):
    def alpha_sigma(self, t) -> tuple[Array, Array]: ...

    def variances(self, t) -> tuple[Array, Array]: ...

    def logsnr(self, t) -> Array: ...

    def model_time(self, t) -> Array: ...

    def from_unit(self, u) -> Array: ...


def _betas_for_alpha_bar(T: int, max_beta: float = 0.999) -> np.ndarray:
    """Squared-cosine betas (Nichol & Dhariwal), as diffusers' `squaredcos_cap_v2`."""

    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
        dtype=np.float32,
    )


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(kind: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas exactly as diffusers' schedulers (and DiT's ``get_named_beta_schedule``) build them."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64).astype(np.float32)
    if kind == "scaled_linear":
        return (np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2).astype(np.float32)
    if kind == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(T)
    raise ValueError(f"unknown beta schedule {kind!r}; expected linear, scaled_linear or squaredcos_cap_v2")


def cumprod_as_torch(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as torch's cumprod does. The zero-SNR
    rescale subtracts the last root from all of them, which would turn float32 accumulation's
    1e-6 into 1e-4 near the end."""
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1, in float32 as diffusers computes it: shift sqrt(alpha_bar) so
    the last is 0 and scale it so the first is unchanged. The last alpha_bar is then exactly 0."""
    root = np.sqrt(cumprod_as_torch(1.0 - np.asarray(betas, np.float32)))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@struct.dataclass
class DiscreteVP:
    """alpha_bar table of a discrete-time variance-preserving process."""

    alphas_cumprod: Array  # (T,) float32

    @classmethod
    def from_betas(cls, kind: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                   zero_snr: bool = False, last_alpha_bar: float = 0.0):
        """``zero_snr``: rescale to zero terminal SNR as diffusers' ``rescale_betas_zero_snr``, with
        ``last_alpha_bar`` in place of the last alpha_bar (0; 2**-24 in diffusers' sigma-based classes)."""
        return cls.from_betas_array(make_betas(kind, T, beta_start, beta_end), zero_snr, last_alpha_bar)

    @classmethod
    def from_betas_array(cls, betas, zero_snr: bool = False, last_alpha_bar: float = 0.0):
        betas = np.asarray(betas, np.float32)
        if not zero_snr:
            return cls(alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas, dtype=np.float32)))
        alphas_cumprod = cumprod_as_torch(1.0 - rescale_zero_terminal_snr(betas))
        alphas_cumprod[-1] = last_alpha_bar
        return cls(alphas_cumprod=jnp.asarray(alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def betas(self) -> Array:
        prev = jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / prev

    def alpha_bar(self, t) -> Array:
        """alpha_bar at timestep t; t = -1 is the clean end (alpha_bar = 1)."""
        table = jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod])
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return table[jnp.clip(t + 1, 0, table.shape[0] - 1)]
        pos = jnp.clip(t + 1.0, 0.0, table.shape[0] - 1.0)
        lo = jnp.floor(pos).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, table.shape[0] - 1)
        frac = pos - lo
        log_lo, log_hi = jnp.log(table[lo]), jnp.log(table[hi])
        # exact at integers: frac == 0 selects table[lo] untouched
        return jnp.where(frac == 0, table[lo], jnp.exp(log_lo + frac * (log_hi - log_lo)))

    def alpha_sigma(self, t):
        ab = self.alpha_bar(t)
        return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)

    def variances(self, t):
        """(a_t^2, s_t^2) = (alpha_bar, 1 - alpha_bar), straight from the table: ancestral
        steps need 1 - ab_t / ab_s, which squaring a rounded sqrt would spoil."""
        ab = self.alpha_bar(t)
        return ab, 1.0 - ab

    def logsnr(self, t):
        ab = self.alpha_bar(t)
        return jnp.log(ab) - jnp.log1p(-ab)

    def t_from_logsnr(self, logsnr):
        """Inverse of ``logsnr`` (float timestep), by interpolation in the monotone table."""
        ls = jnp.log(self.alphas_cumprod) - jnp.log1p(-self.alphas_cumprod)  # decreasing in t
        ts = jnp.arange(self.num_train_timesteps, dtype=jnp.float32)
        return jnp.interp(-logsnr, -ls, ts)

    def model_time(self, t):
        return t

    def from_unit(self, u):
        """Unit time u in [0, 1] (0 = clean end, 1 = noisiest) -> timestep u T - 1 (float)."""
        return jnp.asarray(u, jnp.float32) * self.num_train_timesteps - 1.0

    @property
    def t_max(self):
        return self.num_train_timesteps - 1


@struct.dataclass
class CosineVP:
    """Continuous-time cosine schedule with logSNR clipped to [logsnr_min, logsnr_max].

    logSNR(t) = -2 log tan(a t + b), so logSNR(0) = logsnr_max and logSNR(1) = logsnr_min.
    """

    logsnr_min: float = struct.field(pytree_node=False, default=-20.0)
    logsnr_max: float = struct.field(pytree_node=False, default=20.0)

    def _ab(self):
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
        return a, b

    def logsnr(self, t):
        a, b = self._ab()
        return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))

    def t_from_logsnr(self, logsnr):
        a, b = self._ab()
        return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a

    def alpha_sigma(self, t):
        a2, s2 = self.variances(t)
        return jnp.sqrt(a2), jnp.sqrt(s2)

    def variances(self, t):
        l = self.logsnr(t)
        return jax.nn.sigmoid(l), jax.nn.sigmoid(-l)

    def model_time(self, t):
        return 1000.0 * jnp.asarray(t, jnp.float32)

    def from_unit(self, u):
        return jnp.asarray(u, jnp.float32)

    @property
    def t_max(self):
        return 1.0


def shift_time(t, shift: float):
    """SD3's resolution shift of flow times: t' = S t / (1 + (S - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@struct.dataclass
class RectifiedFlow:
    """z_t = (1 - t) x + t eps with t = sigma in [0, 1]; the network sees 1000 t."""

    shift: float = struct.field(pytree_node=False, default=1.0)
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - t, t

    def variances(self, t):
        a, s = self.alpha_sigma(t)
        return a * a, s * s

    def logsnr(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_logsnr(self, logsnr):
        return jax.nn.sigmoid(-0.5 * logsnr)

    def model_time(self, t):
        return self.num_train_timesteps * jnp.asarray(t, jnp.float32)

    def from_unit(self, u):
        return jnp.asarray(u, jnp.float32)

    @property
    def t_max(self):
        return 1.0


def _diffusers_betas(cfg: dict) -> np.ndarray:
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], np.float32)
    kind = cfg.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise UnsupportedSchedulerOption(cfg.get("_class_name", ""), {"beta_schedule": kind},
                                         f"jdistill builds {BETA_SCHEDULES}")
    return make_betas(kind, int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 1e-4)),
                      float(cfg.get("beta_end", 0.02)))


def diffusers_alphas_cumprod(cfg: dict) -> np.ndarray:
    """alpha_bar as diffusers' scheduler of this config builds it, bit for bit: float32 products
    accumulated in float64 as torch's cumprod does, zero-SNR rescale included.

    Plain DiscreteVP tables keep float32 accumulation (1e-6 apart, what published results were
    computed with); grids that map sigmas back to timesteps (Karras) amplify that to 1e-4 in t
    and read this table instead (``pipelines.scheduling``)."""
    betas = _diffusers_betas(cfg)
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = cumprod_as_torch(1.0 - betas)
    if zero_snr:
        alphas_cumprod[-1] = zero_snr_floor(cfg.get("_class_name", ""))
    return alphas_cumprod


def from_diffusers_config(cfg: dict, strict: bool = True):
    """Build the schedule a diffusers scheduler config describes (betas or trained betas, zero-SNR
    rescale, flow shift).

    ``strict``: also refuse, by name, the config's sampling options that ``timesteps.make_grid``
    and the solvers' default options would not reproduce (Karras sigmas, DPM-Solver variants,
    sigma_min final steps, ...; see ``diffusers_options``). ``pipelines.scheduling.plan`` reads
    those itself and passes False.
    """
    if strict:
        refuse_plain_violations(cfg)
    if "FlowMatch" in cfg.get("_class_name", ""):
        return RectifiedFlow(shift=float(cfg.get("shift", 1.0)), num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
    if cfg.get("use_flow_sigmas", False) and cfg.get("prediction_type") == "flow_prediction":
        # DPMSolverMultistep / UniPC on a flow model: alpha = 1 - sigma, sigma shifted by flow_shift
        return RectifiedFlow(shift=float(cfg.get("flow_shift", 1.0)),
                             num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
    if cfg.get("rescale_betas_zero_snr", False):
        return DiscreteVP(alphas_cumprod=jnp.asarray(diffusers_alphas_cumprod(cfg)))
    return DiscreteVP.from_betas_array(_diffusers_betas(cfg))


def from_config(cfg) -> "Schedule":
    """A schedule from a jdistill config section: ``kind`` = "cosine" (logsnr_min / logsnr_max),
    "discrete" (beta_schedule, num_train_timesteps, beta_start, beta_end) or "flow" (shift)."""
    kind = cfg["kind"]
    if kind == "cosine":
        return CosineVP(float(cfg.get("logsnr_min", -20.0)), float(cfg.get("logsnr_max", 20.0)))
    if kind == "discrete":
        return DiscreteVP.from_betas(cfg.get("beta_schedule", "linear"), int(cfg.get("num_train_timesteps", 1000)),
                                     float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)))
    if kind == "flow":
        return RectifiedFlow(float(cfg.get("shift", 1.0)), int(cfg.get("num_train_timesteps", 1000)))
    raise ValueError(f"unknown schedule kind {kind!r}; expected cosine, discrete or flow")
