"""A diffusers scheduler config -> how jdistill samples it: schedule, prediction, solver, grid.

A pipeline folder's ``scheduler/scheduler_config.json`` fixes the noise schedule (betas or
flow shift, zero-SNR rescale), what the network predicts, and the sampler diffusers would run.
Each supported scheduler class maps onto one of jdistill's solvers over the same time grid
(docs/schedulers.md has every option and its parity test):

====================================  ===============  ======================================
diffusers class                        solver           grid
====================================  ===============  ======================================
DDIMScheduler                          ddim             each step lands ``T // n`` earlier
DDPMScheduler                          ddpm             its timesteps, chained to the clean end
DPMSolverMultistepScheduler            dpmpp_2m         its timesteps (or Karras sigmas), chained
  algorithm_type="sde-dpmsolver++"     dpmpp_sde        the same
EulerDiscreteScheduler                 ddim             its timesteps (or sigmas), chained
EulerAncestralDiscreteScheduler        euler_ancestral  its interpolated sigmas
HeunDiscreteScheduler                  heun             its interpolated (or Karras) sigmas
UniPCMultistepScheduler                unipc            its timesteps (or Karras sigmas), chained
LCMScheduler                           lcm              from its original_inference_steps grid
TCDScheduler                           tcd              LCM's picks, the last step to timestep 0
FlowMatchEulerDiscreteScheduler        euler            its shifted sigmas
DPMSolverMultistepScheduler /          dpmpp_2m,        the class's own flow sigmas
  UniPCMultistepScheduler with         dpmpp_sde,       (``timesteps.flow_multistep_grid``)
  use_flow_sigmas=True, flow_prediction  unipc
====================================  ===============  ======================================

EulerDiscreteScheduler (SDXL's) integrates the same probability-flow ODE in the variables
x / alpha and sigma = s / a; one Euler step there is exactly one deterministic DDIM step in
z = a x + s eps, so it runs as "ddim" on its own timesteps. Its first latents are the unit
noise times ``init_noise_sigma``, which in z is the noise itself for "leading" spacing and
the noise times s at the first timestep for "linspace" / "trailing": ``SamplingPlan.noise_scale``.

A ``solver`` may also be named for any config: it then samples as its diffusers scheduler built
``from_config(config)`` does (that class's options read from the config, its defaults for the
rest; "stochastic" on DDIM's grid, "codi" on LCM's). On a flow config (SD3's FlowMatchEuler) the
multistep solvers sample as their class with ``use_flow_sigmas=True, flow_shift=shift,
prediction_type="flow_prediction"``, the one way diffusers runs them on a flow model (``from_config``
alone would read the flow model as a VP one). On SD 1.5's PNDMScheduler, which has no
jdistill counterpart, naming one is required. Options that would change the grid or the update
in ways jdistill does not reproduce are refused by name (``UnsupportedSchedulerOption``, a
ValueError), never ignored.
"""

from __future__ import annotations

import numpy as np

from jdistill.diffusion import schedules as schedules_lib
from jdistill.diffusion import timesteps as timesteps_lib
from jdistill.diffusion.diffusers_options import UnsupportedSchedulerOption, differs, zero_snr_floor
from jdistill.diffusion.parameterization import check_prediction
from jdistill.pipelines import scheduler_plans as plans
from jdistill.pipelines.scheduler_plans import SamplingPlan
from jdistill.sampling.samplers import SOLVERS

__all__ = ["SCHEDULER_SOLVERS", "SamplingPlan", "UnsupportedSchedulerOption", "default_solver", "plan",
           "prediction_type", "schedule_from_config"]

SCHEDULER_SOLVERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "ddim",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "FlowMatchEulerDiscreteScheduler": "euler",
}
# the diffusers class a named solver samples as
SOLVER_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "stochastic": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_sde": "DPMSolverMultistepScheduler",
    "euler": "FlowMatchEulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "codi": "LCMScheduler",
    "tcd": "TCDScheduler",
}
# FlowMatchEulerDiscreteScheduler options reproduced only at their defaults
_FLOW_DEFAULTS = {
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
_FLOW_SOLVERS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_sde", "euler", "stochastic", "unipc")
# a multistep class's options on a flow config (use_flow_sigmas=True) reproduced only at their defaults
_FLOW_MULTISTEP_DEFAULTS = {
    "DPMSolverMultistepScheduler": dict(solver_order=2, solver_type="midpoint", lower_order_final=True,
                                        euler_at_final=False, final_sigmas_type="zero", thresholding=False,
                                        use_lu_lambdas=False, variance_type=None),
    "UniPCMultistepScheduler": dict(solver_order=2, solver_type="bh2", lower_order_final=True,
                                    final_sigmas_type="zero", predict_x0=True, disable_corrector=[], solver_p=None,
                                    thresholding=False),
}


def without_used_defaults(config: dict) -> dict:
    """The config as diffusers' ``from_config`` reads it: the keys a live scheduler lists in
    ``_use_default_values`` (its class's defaults, never set by its config) dropped, so another
    class built from it takes its own defaults (DDIM's 'leading' spacing is not DPMSolver's)."""
    used = set(config.get("_use_default_values") or ())
    return {k: v for k, v in config.items() if k not in used and k != "_use_default_values"}


def class_name(config: dict) -> str:
    return config.get("_class_name", "")


def is_flow(config: dict) -> bool:
    """A flow-matching config: FlowMatchEuler's, or a multistep class's on flow sigmas."""
    return "FlowMatch" in class_name(config) or (
        bool(config.get("use_flow_sigmas", False)) and config.get("prediction_type") == "flow_prediction")


def prediction_type(config: dict) -> str:
    """jdistill's name of what the network predicts: SD 1.x "eps", SD 2.x "v", SD3 "flow"."""
    if is_flow(config):
        return "flow"
    return check_prediction(config.get("prediction_type", "epsilon"))


def schedule_from_config(config: dict):
    """The noise schedule of a scheduler config (betas, zero-SNR rescale, flow shift). Sampling
    options are :func:`plan`'s to reproduce or refuse."""
    return schedules_lib.from_diffusers_config(config, strict=False)


def default_solver(config: dict) -> str:
    """The jdistill solver that reproduces the config's own scheduler class."""
    name = class_name(config)
    if name not in SCHEDULER_SOLVERS:
        raise UnsupportedSchedulerOption(name, {"_class_name": name},
                                         f"no jdistill solver reproduces it; pass solver= one of {SOLVERS} "
                                         f"(reproduced classes: {', '.join(SCHEDULER_SOLVERS)})")
    if name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "sde-dpmsolver++":
        return "dpmpp_sde"
    return SCHEDULER_SOLVERS[name]


def _check_zero_snr(config: dict, scheduler: str) -> None:
    """A named solver's class must rescale to zero SNR as the config's own class did (the
    schedule is built from the config's class)."""
    if not config.get("rescale_betas_zero_snr"):
        return
    if scheduler == "HeunDiscreteScheduler":
        raise UnsupportedSchedulerOption(scheduler, {"rescale_betas_zero_snr": True},
                                         "HeunDiscreteScheduler does not rescale, the config's schedule does")
    if zero_snr_floor(scheduler) != zero_snr_floor(class_name(config)):
        raise UnsupportedSchedulerOption(scheduler, {"rescale_betas_zero_snr": True},
                                         f"its last alpha_bar differs from {class_name(config)}'s (0 vs 2**-24)")


def _check_terminal_eps(config: dict, schedule, grid) -> None:
    """Zero SNR puts alpha_bar = 0 at the last training timestep: x0 = (z - s eps) / a divides by 0
    there, and diffusers returns inf / NaN. v-prediction (the paper's pairing) has no such step."""
    if prediction_type(config) != "eps" or grid.sigma is not None:
        return
    if float(schedule.alpha_bar(grid.t[0])) == 0.0:
        raise UnsupportedSchedulerOption(class_name(config), {"rescale_betas_zero_snr": True, "prediction_type": "epsilon"},
                                         f"the first timestep {int(grid.t[0])} has alpha_bar = 0, where an eps "
                                         "prediction gives x0 = (z - eps) / 0; use v_prediction")


def _check_first_timestep_once(scheduler: str, grid) -> None:
    """Index-counting schedulers start at the second occurrence of a repeated first timestep
    (meant for img2img), skipping a sigma and running off the end of their list."""
    if scheduler in ("DDIMScheduler", "DDPMScheduler"):
        return
    t = np.asarray(grid.t)
    if np.any(t[1:] == t[0]):
        raise UnsupportedSchedulerOption(scheduler, {"timesteps": t.tolist()},
                                         f"the first timestep {t[0]} repeats; diffusers would start at its second "
                                         "occurrence and step past its last sigma (try fewer steps)")


def _flow_plan(config: dict, schedule, num_steps: int, solver: str) -> SamplingPlan:
    defaults = {**_FLOW_DEFAULTS, **_FLOW_MULTISTEP_DEFAULTS.get(class_name(config), {})}
    bad = {k: config[k] for k, want in defaults.items() if k in config and differs(config[k], want)}
    if class_name(config) == "DPMSolverMultistepScheduler" and config.get("algorithm_type", "dpmsolver++") not in (
            "dpmsolver++", "sde-dpmsolver++"):
        bad["algorithm_type"] = config["algorithm_type"]
    if bad:
        raise UnsupportedSchedulerOption(class_name(config), bad, "jdistill reproduces these only at their defaults")
    if solver not in _FLOW_SOLVERS:
        raise UnsupportedSchedulerOption(class_name(config), {"solver": solver},
                                         f"on a flow-matching schedule jdistill samples with {_FLOW_SOLVERS}")
    return SamplingPlan(solver, timesteps_lib.make_grid(schedule, num_steps, solver))


def _class_plan(req: plans.Request, solver: str, config: dict) -> SamplingPlan:
    name = req.scheduler
    clip_default = class_name(config) in ("DDIMScheduler", "DDPMScheduler")
    if name == "DDIMScheduler":
        return plans.ddim(req, solver, clip_default)
    if name == "DDPMScheduler":
        return plans.ddpm(req, clip_default)
    if name == "DPMSolverMultistepScheduler":
        return plans.dpm_solver(req, solver if solver in ("dpmpp_2m", "dpmpp_sde") else None)
    if name == "EulerDiscreteScheduler":
        return plans.euler(req)
    if name == "EulerAncestralDiscreteScheduler":
        return plans.euler_ancestral(req)
    if name == "HeunDiscreteScheduler":
        return plans.heun(req)
    if name == "UniPCMultistepScheduler":
        return plans.unipc(req)
    if name == "LCMScheduler":
        return plans.lcm(req, solver)
    if name == "TCDScheduler":
        return plans.tcd(req)
    raise UnsupportedSchedulerOption(name, {"_class_name": name}, "no jdistill planner for this class")


def plan(config: dict, num_steps: int | None, solver: str | None = None, schedule=None, *,
         timesteps=None) -> SamplingPlan:
    """How to sample ``num_steps`` steps for a diffusers scheduler config: by default as its own
    scheduler class does; with ``solver``, as that solver's diffusers scheduler built
    ``from_config(config)`` does (``SOLVER_SCHEDULERS``). ``timesteps``: a custom list, as
    ``set_timesteps(timesteps=[...])`` (then ``num_steps`` may be None)."""
    config = without_used_defaults(config)
    if timesteps is not None:
        timesteps = np.asarray(timesteps)
        if num_steps not in (None, len(timesteps)):
            raise ValueError(f"num_steps={num_steps} but {len(timesteps)} custom timesteps")
        num_steps = len(timesteps)
    if num_steps is None or num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    schedule = schedule if schedule is not None else schedule_from_config(config)
    scheduler = SOLVER_SCHEDULERS[solver] if solver is not None else class_name(config)
    solver = solver or default_solver(config)
    if is_flow(config):
        if timesteps is not None:
            raise UnsupportedSchedulerOption(class_name(config), {"timesteps": timesteps.tolist()},
                                             "custom timesteps on flow schedules are not reproduced")
        return _flow_plan(config, schedule, num_steps, solver)
    _check_zero_snr(config, scheduler)
    if timesteps is not None:
        timesteps = timesteps_lib.check_custom(timesteps, schedule.num_train_timesteps)
    req = plans.Request(config, scheduler, schedule, schedules_lib.diffusers_alphas_cumprod(config), num_steps,
                        timesteps)
    result = _class_plan(req, solver, config)
    _check_terminal_eps(config, schedule, result.grid)
    _check_first_timestep_once(scheduler, result.grid)
    return result
