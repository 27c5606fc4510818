"""Which options of a diffusers scheduler config jdistill reproduces, and the error for the others.

Two paths read a scheduler config:

* ``schedules.from_diffusers_config`` builds the noise schedule for low-level use with
  ``timesteps.make_grid`` and the samplers at their default options. Options that would make
  diffusers sample differently from that (Karras sigmas, DPM-Solver's heun / SDE variants, a
  sigma_min final step, ...) are not part of a schedule, so it refuses them by name
  (``strict``) rather than letting them be dropped.
* ``pipelines.scheduling.plan`` reads those options too and reproduces them (or refuses what
  no jdistill solver reproduces); it builds its schedule with ``strict=False``.
"""

from __future__ import annotations

import math

from jdistill.errors import InvalidArgument


class UnsupportedSchedulerOption(InvalidArgument):
    """A scheduler config option jdistill would not reproduce exactly; ``options`` names them
    (a ValueError, and a UserError: the CLI reports it in one line)."""

    def __init__(self, scheduler: str, options: dict, reason: str):
        self.options = dict(options)
        listed = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        super().__init__(f"{scheduler or 'scheduler'} config sets {listed}: {reason}")


# rescale_betas_zero_snr leaves alpha_bar[-1] = 0 exactly in these classes...
ZERO_SNR_EXACT = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler")
# ...and these put 2**-24 in its place, so that sigma = sqrt((1 - ab) / ab) stays finite
ZERO_SNR_FLOORED = ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "UniPCMultistepScheduler")
ZERO_SNR_FLOOR = 2.0**-24


def zero_snr_floor(scheduler: str) -> float:
    """The alpha_bar a zero-SNR rescale leaves at the last timestep in ``scheduler``'s class."""
    if scheduler in ZERO_SNR_FLOORED:
        return ZERO_SNR_FLOOR
    if scheduler in ZERO_SNR_EXACT:
        return 0.0
    known = ", ".join(ZERO_SNR_EXACT + ZERO_SNR_FLOORED)
    raise UnsupportedSchedulerOption(
        scheduler, {"rescale_betas_zero_snr": True},
        "the last alpha_bar after the rescale depends on the scheduler class (0 in DDIM / DDPM / LCM, 2**-24 in "
        f"DPM-Solver / Euler / UniPC); name one of {known} in the config's _class_name")


def differs(value, default) -> bool:
    """Whether a config value asks for something other than ``default`` (None reads as False / empty)."""
    if default is False or default == []:
        return bool(value)
    if isinstance(default, float) and math.isinf(default):
        return value is not None and value != default
    return value != default


# Options the low-level path (make_grid + a solver's default options) reproduces only at these values
_PLAIN = {
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
    "thresholding": False,
    "lambda_min_clipped": -math.inf,
    "euler_at_final": False,
    "sigma_min": None,
    "sigma_max": None,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "predict_x0": True,
    "disable_corrector": [],
    "solver_p": None,
}
# solver_type: DPM-Solver's default is midpoint, UniPC's bh2 (each maps the other's names to its own)
_PLAIN_SOLVER_TYPE = {"DPMSolverMultistepScheduler": ("midpoint", "bh1", "bh2", "logrho"),
                      "UniPCMultistepScheduler": ("bh2", "midpoint", "heun", "logrho")}


def plain_sampling_violations(config: dict) -> dict:
    """The config's options that sampling with ``make_grid`` and default solver options would not honour."""
    bad = {k: config[k] for k, want in _PLAIN.items() if k in config and differs(config[k], want)}
    solver_type = config.get("solver_type")
    plain_types = _PLAIN_SOLVER_TYPE.get(config.get("_class_name", ""), ("midpoint", "bh2"))
    if solver_type is not None and solver_type not in plain_types:
        bad["solver_type"] = solver_type
    if config.get("_class_name") == "UniPCMultistepScheduler" and differs(config.get("lower_order_final", True), True):
        bad["lower_order_final"] = config["lower_order_final"]
    return bad


def refuse_plain_violations(config: dict) -> None:
    bad = plain_sampling_violations(config)
    if bad:
        raise UnsupportedSchedulerOption(
            config.get("_class_name", ""), bad,
            "sampling with timesteps.make_grid and a solver's default options would not reproduce this; "
            "jdistill.pipelines.scheduling.plan(config, num_steps) reproduces the supported ones "
            "(see docs/schedulers.md)")
