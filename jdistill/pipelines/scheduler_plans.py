"""One planner per diffusers scheduler class: its config options -> a jdistill solver, the solver's
options and grid, or a refusal naming the option (``UnsupportedSchedulerOption``).

Each planner reads only the keys its class's ``__init__`` takes, with that class's defaults, so a
solver named for another class's config samples as ``TheClass.from_config(config)`` would.
docs/schedulers.md lists what each reproduces and refuses.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jdistill.diffusion import timesteps as ts_lib
from jdistill.diffusion.diffusers_options import UnsupportedSchedulerOption, differs
from jdistill.diffusion.solvers import DDPM_VARIANCES, vp_from_sigma
from jdistill.diffusion.timesteps import SPACINGS, TimeGrid


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """What :func:`jdistill.sampling.samplers.sample` needs besides the denoiser: the solver and
    its options, the grid, the factor on unit noise that gives z at ``grid.t[0]``, and the factor
    on the final z that gives diffusers' final latents (``final_scale``: its sigma-stepping
    schedulers return x = z / a, which differs from z only when the last sigma is not 0)."""

    solver: str
    grid: TimeGrid
    noise_scale: float = 1.0
    clip_x0: float | None = None
    ddpm_variance: str = "fixed_small"
    options: tuple = ()  # further solver options (name, value), only those off their default
    final_scale: float = 1.0

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    def sample_options(self) -> dict:
        """Keyword options for ``samplers.sample`` / ``stitch.sample``."""
        return {"clip_x0": self.clip_x0, "ddpm_variance": self.ddpm_variance, **dict(self.options)}


@dataclasses.dataclass(frozen=True)
class Request:
    """A config read as the diffusers class ``scheduler`` reads it, and what to sample."""

    config: dict
    scheduler: str
    schedule: object
    alphas_cumprod: np.ndarray  # diffusers' own table, for grids that map sigmas to timesteps
    num_steps: int
    timesteps: np.ndarray | None = None

    def get(self, key, default):
        value = self.config.get(key, default)
        return default if value is None else value

    def refuse(self, options: dict, reason: str):
        raise UnsupportedSchedulerOption(self.scheduler, options, reason)

    def only(self, **defaults):
        """Refuse every given key the config sets off its default."""
        bad = {k: self.config[k] for k, want in defaults.items() if k in self.config and differs(self.config[k], want)}
        if bad:
            self.refuse(bad, "jdistill reproduces these options only at their defaults")

    @property
    def T(self) -> int:
        return self.schedule.num_train_timesteps

    def spacing(self, default: str) -> str:
        spacing = self.get("timestep_spacing", default)
        if spacing not in SPACINGS:
            self.refuse({"timestep_spacing": spacing}, f"expected one of {SPACINGS}")
        return spacing

    @property
    def offset(self) -> int:
        return int(self.get("steps_offset", 0))

    def final(self) -> str:
        final = self.get("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            self.refuse({"final_sigmas_type": final}, "expected 'zero' or 'sigma_min'")
        return final

    def no_custom_timesteps(self):
        if self.timesteps is not None:
            self.refuse({"timesteps": self.timesteps.tolist()}, f"{self.scheduler}.set_timesteps takes no custom "
                        "timesteps (trailing spacing gives [999, 749, 499, 249] for 4 steps)")

    def no_karras_with_custom(self):
        if self.timesteps is not None and self.get("use_karras_sigmas", False):
            self.refuse({"use_karras_sigmas": True, "timesteps": self.timesteps.tolist()},
                        "diffusers refuses custom timesteps with Karras sigmas")

    def clip(self, default: bool) -> float | None:
        return float(self.get("clip_sample_range", 1.0)) if self.get("clip_sample", default) else None


def _options(**values_and_defaults) -> tuple:
    """(name, value) pairs of the options off their default: name=(value, default)."""
    return tuple((k, v) for k, (v, d) in values_and_defaults.items() if v != d)


def _first_noise_scale(req: Request, grid: TimeGrid) -> float:
    """Euler-type schedulers start from unit noise times init_noise_sigma in x = z / a: in z that is
    the noise itself for "leading" spacing and s at the first step for "linspace" / "trailing"."""
    if req.spacing("linspace") == "leading":
        return 1.0
    if grid.sigma is None:
        return float(req.schedule.alpha_sigma(grid.t[0])[1])
    return float(vp_from_sigma(np.float32(grid.sigma[0]))[1])


def _final_scale(req: Request, grid: TimeGrid, final: str) -> float:
    """1 / a at the last sigma, where diffusers' Euler returns x = z / a short of sigma 0."""
    if final == "zero":
        return 1.0
    if grid.sigma_next is not None:
        return float(np.sqrt(np.float32(grid.sigma_next[-1]) ** 2 + 1.0))
    a, _ = req.schedule.alpha_sigma(grid.t_next[-1])
    return 1.0 / float(a)


def _chained(ts, final: str = "zero") -> TimeGrid:
    grid = ts_lib.chain_grid(np.asarray(ts).astype(np.int32))
    return ts_lib.final_grid(grid, 0) if final == "sigma_min" else grid


# ------------------------------------------------------------------------------- the classes


def ddim(req: Request, solver: str, clip_default: bool) -> SamplingPlan:
    req.only(thresholding=False)
    req.no_custom_timesteps()
    grid = ts_lib.ddim_grid(req.T, req.num_steps, req.spacing("leading"), req.offset,
                            bool(req.get("set_alpha_to_one", True)))
    return SamplingPlan(solver, grid, clip_x0=req.clip(clip_default) if solver == "ddim" else None)


def ddpm(req: Request, clip_default: bool) -> SamplingPlan:
    req.only(thresholding=False)
    variance = req.get("variance_type", "fixed_small")
    if variance not in DDPM_VARIANCES:
        req.refuse({"variance_type": variance}, f"jdistill's DDPM step reproduces {DDPM_VARIANCES}")
    ts = req.timesteps if req.timesteps is not None else ts_lib.spaced_timesteps(
        req.T, req.num_steps, req.spacing("leading"), req.offset)
    if variance != "fixed_small" and ts[-1] > 0:
        # diffusers adds noise whenever t > 0, jdistill's last DDPM step is mean-only; they agree
        # (to 1e-10) only for fixed_small, whose variance to the clean end is 0
        req.refuse({"variance_type": variance}, f"the last step starts at t = {int(ts[-1])} > 0, where diffusers "
                   "still adds noise of this variance")
    return SamplingPlan("ddpm", _chained(ts), clip_x0=req.clip(clip_default), ddpm_variance=variance)


_DPM_ALGORITHMS = {"dpmsolver++": "dpmpp_2m", "deis": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_sde"}


def dpm_solver(req: Request, solver: str | None) -> SamplingPlan:
    algorithm = req.get("algorithm_type", "dpmsolver++")
    if algorithm not in _DPM_ALGORITHMS:
        req.refuse({"algorithm_type": algorithm}, "jdistill reproduces dpmsolver++ and sde-dpmsolver++")
    solver = solver or _DPM_ALGORITHMS[algorithm]  # a named solver picks the algorithm
    order = int(req.get("solver_order", 2))
    if order not in (1, 2):
        req.refuse({"solver_order": order}, "jdistill reproduces DPM-Solver++ of order 1 and 2")
    solver_type = req.get("solver_type", "midpoint")
    solver_type = "midpoint" if solver_type in ("bh1", "bh2", "logrho") else solver_type  # as diffusers maps them
    if solver_type not in ("midpoint", "heun"):
        req.refuse({"solver_type": solver_type}, "expected 'midpoint' or 'heun'")
    req.only(thresholding=False, use_lu_lambdas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
             use_flow_sigmas=False, use_dynamic_shifting=False, lambda_min_clipped=-math.inf)
    if req.get("prediction_type", "epsilon") == "flow_prediction":
        req.refuse({"prediction_type": "flow_prediction"}, "a flow model samples with use_flow_sigmas=True")
    final = req.final()
    req.no_karras_with_custom()
    if req.get("use_karras_sigmas", False):
        round_t = req.get("beta_schedule", "linear") != "squaredcos_cap_v2"
        grid = ts_lib.dpm_karras_grid(req.alphas_cumprod, req.num_steps, round_t, final=final)
    else:
        ts = req.timesteps if req.timesteps is not None else ts_lib.dpm_timesteps(
            req.T, req.num_steps, req.spacing("linspace"), req.offset)
        grid = _chained(ts, final)
    last_first_order = bool(req.get("euler_at_final", False) or (req.get("lower_order_final", True)
                            and grid.num_steps < 15) or final == "zero")
    options = _options(solver_order=(order, 2), solver_type=(solver_type, "midpoint"),
                       lower_order_final=(last_first_order, True))
    return SamplingPlan(solver, grid, options=options)


def euler(req: Request) -> SamplingPlan:
    """EulerDiscreteScheduler: one Euler step in x = z / a is one DDIM step in z, so it runs as
    "ddim" on its timesteps: integer ones on the schedule's table, others (and zero-SNR schedules,
    whose first sigma of 4096 needs diffusers' own rounding) on its own sigmas."""
    req.only(interpolation_type="linear", timestep_type="discrete", use_exponential_sigmas=False,
             use_beta_sigmas=False)
    final = req.final()
    req.no_karras_with_custom()
    karras = bool(req.get("use_karras_sigmas", False))
    ts = np.asarray(req.timesteps, np.float32) if req.timesteps is not None else ts_lib.euler_timesteps(
        req.T, req.num_steps, req.spacing("linspace"), req.offset)
    zero_snr = bool(req.get("rescale_betas_zero_snr", False))
    if not karras and not zero_snr and np.array_equal(ts, np.round(ts)):
        grid = _chained(ts, final)  # the schedule's own table (results from before sigma grids)
    else:
        grid = ts_lib.euler_grid(req.alphas_cumprod, ts, karras, req.get("sigma_min", None),
                                 req.get("sigma_max", None), final)
    if zero_snr and float(grid.t[0]) == req.T - 1 and req.get("prediction_type", "epsilon") != "epsilon":
        # measured: diffusers' own float32 result is 5e-5 from its float64 one there
        req.refuse({"rescale_betas_zero_snr": True, "prediction_type": req.get("prediction_type", "epsilon")},
                   f"the first Euler step from sigma = {float(grid.sigma[0]):.0f} cancels terms 200x the result; "
                   "diffusers' float32 rounding there (5e-5 of the result) is not reproduced bit for bit. "
                   "Leading spacing, or DPM-Solver++ / UniPC / Euler ancestral / DDIM, reproduce zero SNR")
    return SamplingPlan("ddim", grid, _first_noise_scale(req, grid), final_scale=_final_scale(req, grid, final))


def euler_ancestral(req: Request) -> SamplingPlan:
    if req.get("prediction_type", "epsilon") == "sample":
        req.refuse({"prediction_type": "sample"}, "EulerAncestralDiscreteScheduler does not implement it")
    req.no_custom_timesteps()
    grid = ts_lib.euler_grid(req.alphas_cumprod, ts_lib.euler_timesteps(req.T, req.num_steps,
                                                                        req.spacing("linspace"), req.offset))
    return SamplingPlan("euler_ancestral", grid, _first_noise_scale(req, grid))


def heun(req: Request) -> SamplingPlan:
    req.only(use_exponential_sigmas=False, use_beta_sigmas=False)
    req.no_karras_with_custom()
    ts = np.asarray(req.timesteps, np.float32) if req.timesteps is not None else ts_lib.euler_timesteps(
        req.T, req.num_steps, req.spacing("linspace"), req.offset)
    grid = ts_lib.euler_grid(req.alphas_cumprod, ts, bool(req.get("use_karras_sigmas", False)))
    return SamplingPlan("heun", grid, _first_noise_scale(req, grid), clip_x0=req.clip(False))


def unipc(req: Request) -> SamplingPlan:
    order = int(req.get("solver_order", 2))
    if order not in (1, 2, 3):
        req.refuse({"solver_order": order}, "jdistill reproduces UniPC of order 1 to 3")
    variant = req.get("solver_type", "bh2")
    variant = "bh2" if variant in ("midpoint", "heun", "logrho") else variant  # as diffusers maps them
    if variant not in ("bh1", "bh2"):
        req.refuse({"solver_type": variant}, "expected 'bh1' or 'bh2'")
    req.only(predict_x0=True, disable_corrector=[], solver_p=None, thresholding=False, use_exponential_sigmas=False,
             use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False, shift_terminal=None)
    if req.get("prediction_type", "epsilon") == "flow_prediction":
        req.refuse({"prediction_type": "flow_prediction"}, "a flow model samples with use_flow_sigmas=True")
    final = req.final()
    lower_order_final = bool(req.get("lower_order_final", True))
    if not lower_order_final and final == "zero":
        req.refuse({"lower_order_final": False, "final_sigmas_type": "zero"},
                   "diffusers' last step then divides by r = 0 (lambda = inf at sigma 0)")
    if variant == "bh1" and final == "zero":
        req.refuse({"solver_type": "bh1", "final_sigmas_type": "zero"},
                   "diffusers' last step computes B(h) * 0 with B(h) = h = -inf there: NaN")
    req.no_custom_timesteps()
    if req.get("use_karras_sigmas", False):
        grid = ts_lib.dpm_karras_grid(req.alphas_cumprod, req.num_steps, True, req.get("sigma_min", None),
                                      req.get("sigma_max", None), final, final_is_last_karras=True)
    else:
        grid = _chained(ts_lib.dpm_timesteps(req.T, req.num_steps, req.spacing("linspace"), req.offset), final)
    options = _options(solver_order=(order, 2), solver_type=(variant, "bh2"),
                       lower_order_final=(lower_order_final, True))
    return SamplingPlan("unipc", grid, options=options)


def lcm(req: Request, solver: str) -> SamplingPlan:
    req.only(thresholding=False)
    ts = req.timesteps if req.timesteps is not None else ts_lib.lcm_timesteps(
        req.T, req.num_steps, int(req.get("original_inference_steps", 50)))
    options = _options(timestep_scaling=(float(req.get("timestep_scaling", 10.0)), 10.0))
    return SamplingPlan(solver, _chained(ts), clip_x0=req.clip(False), options=options)


def tcd(req: Request) -> SamplingPlan:
    """TCDScheduler: LCMScheduler's timesteps (no spacing, no offset), each step landing on the next,
    the last on timestep 0. Its step reads neither clip_sample nor thresholding nor
    timestep_scaling, and neither does the plan; eta (its gamma) is a call option, as in diffusers'
    pipelines (``pipe(..., eta=)``, default 0)."""
    ts = req.timesteps if req.timesteps is not None else ts_lib.lcm_timesteps(
        req.T, req.num_steps, int(req.get("original_inference_steps", 50)))
    return SamplingPlan("tcd", ts_lib.custom_grid(req.schedule, "tcd", ts))
