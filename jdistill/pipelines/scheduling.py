"""A diffusers scheduler config -> how jdistill samples it: schedule, prediction, solver, grid.

A pipeline folder's ``scheduler/scheduler_config.json`` fixes the noise schedule (betas or
flow shift), what the network predicts, and the sampler diffusers would run. Each supported
scheduler class maps onto one of jdistill's solvers over the same time grid:

==================================  ============  ==========================================
diffusers class                      solver        grid
==================================  ============  ==========================================
DDIMScheduler                        ddim          each step lands ``T // n`` earlier
DDPMScheduler                        ddpm          its timesteps, chained to the clean end
DPMSolverMultistepScheduler          dpmpp_2m      its timesteps, chained (DPM-Solver++ 2M)
EulerDiscreteScheduler               ddim          its timesteps, chained (see below)
FlowMatchEulerDiscreteScheduler      euler         its shifted sigmas
==================================  ============  ==========================================

EulerDiscreteScheduler (SDXL's) integrates the same probability-flow ODE in the variables
x / alpha and sigma = s / a; one Euler step there is exactly one deterministic DDIM step in
z = a x + s eps, so it runs as "ddim" on its own timesteps. Its first latents are the unit
noise times ``init_noise_sigma``, which in z is the noise itself for "leading" spacing and
the noise times s at the first timestep for "linspace" / "trailing": ``SamplingPlan.noise_scale``.

A ``solver`` may also be named for any config: the grid is then the one its own diffusers
scheduler would make ``from_config(config)`` (the config's spacing, offset and
``set_alpha_to_one``); on SD 1.5's PNDMScheduler, which has no jdistill counterpart, naming
one is required. Options that change the grid or the update in ways jdistill does not
reproduce (Karras / exponential / beta sigmas, thresholding, zero-SNR rescaling, dynamic
shifting, other DPM-Solver variants, ...) are refused by name rather than ignored.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jdistill.diffusion import schedules as schedules_lib
from jdistill.diffusion import timesteps as timesteps_lib
from jdistill.diffusion.parameterization import check_prediction
from jdistill.diffusion.solvers import DDPM_VARIANCES
from jdistill.diffusion.timesteps import TimeGrid
from jdistill.sampling.samplers import SOLVERS

SCHEDULER_SOLVERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "ddim",
    "FlowMatchEulerDiscreteScheduler": "euler",
}

# config key -> the only value jdistill's grids and solvers reproduce (absent keys take it)
_REQUIRED = {
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "final_sigmas_type": "zero",
    "timestep_type": "discrete",
    "interpolation_type": "linear",
}
# DPMSolverMultistepScheduler as its default solver: only DPM-Solver++ of order 2
_DPM_REQUIRED = {"algorithm_type": "dpmsolver++", "solver_order": 2}


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """What :func:`jdistill.sampling.samplers.sample` needs besides the denoiser: the solver and
    its options, the grid, and the factor on unit noise that gives z at ``grid.t[0]``."""

    solver: str
    grid: TimeGrid
    noise_scale: float = 1.0
    clip_x0: float | None = None
    ddpm_variance: str = "fixed_small"

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps


def class_name(config: dict) -> str:
    return config.get("_class_name", "")


def is_flow(config: dict) -> bool:
    return "FlowMatch" in class_name(config)


def prediction_type(config: dict) -> str:
    """jdistill's name of what the network predicts: SD 1.x "eps", SD 2.x "v", SD3 "flow"."""
    if is_flow(config):
        return "flow"
    return check_prediction(config.get("prediction_type", "epsilon"))


def schedule_from_config(config: dict):
    """The noise schedule of a scheduler config (``schedules.from_diffusers_config``), after
    checking it describes one jdistill reproduces."""
    _check_required(config, _REQUIRED)
    return schedules_lib.from_diffusers_config(config)


def default_solver(config: dict) -> str:
    """The jdistill solver that reproduces the config's own scheduler class."""
    name = class_name(config)
    if name not in SCHEDULER_SOLVERS:
        raise ValueError(f"no jdistill solver reproduces {name or 'this scheduler'}; pass solver= one of {SOLVERS} "
                         f"(reproduced classes: {', '.join(SCHEDULER_SOLVERS)})")
    return SCHEDULER_SOLVERS[name]


def _check_required(config: dict, required: dict) -> None:
    bad = {k: config[k] for k, want in required.items() if k in config and config[k] != want
           and not (want is False and config[k] is None)}
    lam = config.get("lambda_min_clipped", -math.inf)
    if lam is not None and lam != -math.inf:
        bad["lambda_min_clipped"] = lam
    if bad:
        raise ValueError(f"{class_name(config) or 'scheduler'} config sets {bad}, which jdistill's samplers do not "
                         "reproduce; use a config without them")


def _euler_discrete_grid(config: dict, schedule, num_steps: int) -> tuple[TimeGrid, float]:
    """EulerDiscreteScheduler's timesteps chained to the clean end, and its initial noise scale."""
    T = schedule.num_train_timesteps
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1]
        if not np.array_equal(ts, np.round(ts)):
            # diffusers then interpolates sigma linearly between table entries, which the
            # discrete schedule (interpolating log alpha_bar) does not reproduce
            raise ValueError(f"EulerDiscreteScheduler with linspace spacing puts {num_steps} steps at non-integer "
                             "timesteps; use timestep_spacing 'leading' / 'trailing', a step count n with "
                             f"({T} - 1) % (n - 1) == 0, or another solver")
        ts = ts.astype(np.int32)
    else:
        ts = timesteps_lib.spaced_timesteps(T, num_steps, spacing, int(config.get("steps_offset", 0)))
    grid = timesteps_lib.chain_grid(ts)
    if spacing == "leading":  # init_noise_sigma = sqrt(sigma^2 + 1) = 1 / a: z is the unit noise
        return grid, 1.0
    # init_noise_sigma = sigma: z = a sigma noise = s noise
    _, s = schedule.alpha_sigma(grid.t[0])
    return grid, float(s)


def plan(config: dict, num_steps: int, solver: str | None = None, schedule=None) -> SamplingPlan:
    """How to sample ``num_steps`` steps for a diffusers scheduler config: by default as its
    own scheduler class does; with ``solver``, as that solver's diffusers scheduler built
    ``from_config(config)`` does ("ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmpp_2m":
    DPMSolverMultistepScheduler, "euler": FlowMatchEulerDiscreteScheduler; "stochastic" on
    DDIM's grid)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    schedule = schedule if schedule is not None else schedule_from_config(config)
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    name = class_name(config)
    if solver is None and name == "EulerDiscreteScheduler":
        grid, noise_scale = _euler_discrete_grid(config, schedule, num_steps)
        return SamplingPlan("ddim", grid, noise_scale)
    solver = solver or default_solver(config)
    if name == "DPMSolverMultistepScheduler" and solver == "dpmpp_2m":
        _check_required(config, _DPM_REQUIRED)

    grid = timesteps_lib.make_grid(schedule, num_steps, solver, spacing=config.get("timestep_spacing"),
                                   steps_offset=int(config.get("steps_offset", 0)),
                                   set_alpha_to_one=bool(config.get("set_alpha_to_one", True)))
    clip_x0 = None
    if solver in ("ddim", "ddpm") and not is_flow(config):
        # DDIM / DDPM schedulers clip x0 unless told not to; their configs always say (SD's: false)
        clip_default = class_name(config) in ("DDIMScheduler", "DDPMScheduler")
        if config.get("clip_sample", clip_default):
            clip_x0 = float(config.get("clip_sample_range", 1.0))
    variance = config.get("variance_type") or "fixed_small"
    if solver == "ddpm" and variance not in DDPM_VARIANCES:
        raise ValueError(f"DDPM variance_type {variance!r} is not reproduced (one of {DDPM_VARIANCES})")
    return SamplingPlan(solver, grid, 1.0, clip_x0, variance if variance in DDPM_VARIANCES else "fixed_small")
