"""Every scheduler option either reproduces diffusers or is refused by name, on every path.

The mapper (``pipelines.scheduling.plan``) and the low-level path (``schedules.from_diffusers_config``
+ ``timesteps.make_grid`` + a solver by name) both raise ``UnsupportedSchedulerOption`` (a
ValueError) naming option=value. Options that used to run silently differently are now exact
(trajectories against diffusers) or refused, each on both paths.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_schedulers_parity import SD, config_of, run_diffusers, run_plan, unit_noise, zero_snr
from test_solvers_parity import make_denoiser, step_noises

from jdistill.diffusion import schedules, timesteps
from jdistill.diffusion.diffusers_options import UnsupportedSchedulerOption
from jdistill.pipelines import scheduling
from jdistill.sampling import samplers
from jdistill.testing import assert_close, relative_error

TOL = 1e-5


def low_level(config, n, solver, spacing=None, schedule=None):
    """z after ``n`` steps of ``solver`` from unit noise, on ``make_grid`` and the config's schedule."""
    schedule = schedule or schedules.from_diffusers_config(config)
    grid = timesteps.make_grid(schedule, n, solver, spacing=spacing, set_alpha_to_one=config.get("set_alpha_to_one", True))
    den = make_denoiser(schedule, scheduling.prediction_type(config))
    return np.asarray(samplers.sample_jit(den, jnp.asarray(unit_noise()), grid=grid, solver=solver,
                                          rng=jax.random.key(11)))


# ------------------------------------------------------------------------------- once wrong, now exact


def test_ddim_zero_snr_now_exact_on_both_paths(monkeypatch):
    """A DDIM zero-SNR config was accepted by from_diffusers_config with the plain betas (8e-2 off)."""
    ref = diffusers.DDIMScheduler(**zero_snr(clip_sample=False))
    config = config_of(ref)
    expected = run_diffusers(monkeypatch, ref, unit_noise(), 10)
    assert_close(low_level(config, 10, "ddim", "trailing"), expected, TOL, "low-level DDIM zero SNR")
    assert_close(run_plan(config, unit_noise(), 10, jax.random.key(11))[0], expected, TOL, "planned DDIM zero SNR")
    plain = schedules.from_diffusers_config({**config, "rescale_betas_zero_snr": False})
    assert relative_error(low_level(config, 10, "ddim", "trailing", plain), expected) > 1e-2  # what it was


@pytest.mark.parametrize("kw,option", [
    (dict(solver_type="heun"), "solver_type='heun'"),  # ran as midpoint
    (dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
    (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
    (dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    (dict(solver_order=1), "solver_order=1"),
])
def test_dpm_solver_options_exact_when_planned_refused_low_level(monkeypatch, kw, option):
    """make_grid + "dpmpp_2m" cannot carry these: from_diffusers_config names them; plan reproduces them."""
    ref = diffusers.DPMSolverMultistepScheduler(**SD, **kw)
    config = config_of(ref)
    with pytest.raises(UnsupportedSchedulerOption, match=option.replace("+", r"\+")):
        schedules.from_diffusers_config(config)
    key = jax.random.key(11)
    ours, plan = run_plan(config, unit_noise(), 12, key)
    expected = run_diffusers(monkeypatch, ref, unit_noise(), 12, None, step_noises(key, 12))
    assert_close(ours, expected, TOL, f"planned DPM-Solver++ {option}")
    plain = config_of(diffusers.DPMSolverMultistepScheduler(**SD))
    assert relative_error(low_level(plain, 12, "dpmpp_2m"), expected) > 1e-4  # the option matters


# ------------------------------------------------------------------------------- refused, by name

_DPM = diffusers.DPMSolverMultistepScheduler
_EULER = diffusers.EulerDiscreteScheduler
_UNIPC = diffusers.UniPCMultistepScheduler
REFUSED = [
    # class, config, steps, custom timesteps, the option=value the message names, refused low-level too
    (_DPM, dict(solver_order=3), 10, None, "solver_order=3", True),
    (_DPM, dict(use_lu_lambdas=True), 10, None, "use_lu_lambdas=True", True),
    (_DPM, dict(use_exponential_sigmas=True), 10, None, "use_exponential_sigmas=True", True),
    (_DPM, dict(lambda_min_clipped=-5.1), 10, None, "lambda_min_clipped=-5.1", True),
    (_DPM, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 10, None, "algorithm_type='dpmsolver'", True),
    (_DPM, dict(thresholding=True), 10, None, "thresholding=True", True),
    (_DPM, dict(prediction_type="flow_prediction"), 10, None, "prediction_type='flow_prediction'", False),
    (_DPM, dict(use_karras_sigmas=True), None, [999, 500, 10], "use_karras_sigmas=True", True),
    (_DPM, dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True), 12, None, "timesteps=[998, 998", True),
    (diffusers.DDIMScheduler, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10, None,
     "rescale_betas_zero_snr=True, prediction_type='epsilon'", False),
    (diffusers.DDIMScheduler, dict(), None, [999, 749, 499, 249], "timesteps=[999, 749, 499, 249]", False),
    (diffusers.DDPMScheduler, dict(variance_type="fixed_large", timestep_spacing="trailing"), 10, None,
     "variance_type='fixed_large'", False),
    (diffusers.DDPMScheduler, dict(variance_type="fixed_small_log"), 10, None, "variance_type='fixed_small_log'", False),
    (diffusers.DDPMScheduler, dict(beta_schedule="sigmoid"), 10, None, "beta_schedule='sigmoid'", True),
    (_EULER, dict(interpolation_type="log_linear"), 10, None, "interpolation_type='log_linear'", True),
    (_EULER, dict(timestep_type="continuous", prediction_type="v_prediction"), 10, None,
     "timestep_type='continuous'", True),
    (_EULER, dict(use_beta_sigmas=True), 10, None, "use_beta_sigmas=True", True),
    (_EULER, zero_snr(), 10, None, "rescale_betas_zero_snr=True, prediction_type='v_prediction'", False),
    (diffusers.EulerAncestralDiscreteScheduler, dict(prediction_type="sample"), 10, None,
     "prediction_type='sample'", False),
    (diffusers.EulerAncestralDiscreteScheduler, dict(), None, [999, 500], "timesteps=[999, 500]", False),
    (_UNIPC, dict(predict_x0=False), 10, None, "predict_x0=False", True),
    (_UNIPC, dict(disable_corrector=[1]), 10, None, "disable_corrector=[1]", True),
    (_UNIPC, dict(solver_order=4), 10, None, "solver_order=4", True),
    (_UNIPC, dict(solver_type="bh1"), 10, None, "solver_type='bh1', final_sigmas_type='zero'", True),
    (_UNIPC, dict(lower_order_final=False), 10, None, "lower_order_final=False", True),
    (_UNIPC, dict(use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.1), 10, None,
     "shift_terminal=0.1", False),
    (_UNIPC, dict(), None, [999, 500], "timesteps=[999, 500]", False),
    (diffusers.LCMScheduler, dict(thresholding=True), 4, None, "thresholding=True", True),
    (diffusers.FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True), 10, None,
     "use_dynamic_shifting=True", True),
    (diffusers.PNDMScheduler, dict(), 10, None, "_class_name='PNDMScheduler'", False),
]


@pytest.mark.parametrize("cls,kw,n,custom,named,low", REFUSED,
                         ids=[f"{c[0].__name__}-{c[4].split('=')[0]}" for c in REFUSED])
def test_refused_by_name_on_every_path(cls, kw, n, custom, named, low):
    config = config_of(cls(**kw))
    with pytest.raises(UnsupportedSchedulerOption) as refused:
        scheduling.plan(config, n, timesteps=custom)
    assert isinstance(refused.value, ValueError) and named in str(refused.value), str(refused.value)
    if low:  # an option make_grid would drop: named as soon as the schedule is built from the config
        with pytest.raises(UnsupportedSchedulerOption, match=named.split("=")[0]):
            schedules.from_diffusers_config(config)


def test_named_solvers_refuse_what_their_class_cannot_run():
    euler_zero_snr = config_of(diffusers.EulerDiscreteScheduler(**zero_snr()))
    with pytest.raises(UnsupportedSchedulerOption, match="HeunDiscreteScheduler does not rescale"):
        scheduling.plan(euler_zero_snr, 10, "heun")
    with pytest.raises(UnsupportedSchedulerOption, match=r"last alpha_bar differs"):
        scheduling.plan(euler_zero_snr, 10, "ddim")  # DDIM keeps alpha_bar = 0 where Euler put 2**-24
    flow = config_of(diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(UnsupportedSchedulerOption, match="solver='heun'"):
        scheduling.plan(flow, 10, "heun")
    # a multistep class on flow sigmas: its options off their defaults are named
    for cls, kw in [(diffusers.DPMSolverMultistepScheduler, dict(solver_order=3)),
                    (diffusers.DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min")),
                    (diffusers.DPMSolverMultistepScheduler, dict(euler_at_final=True)),
                    (diffusers.UniPCMultistepScheduler, dict(solver_type="bh1"))]:
        config = config_of(cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", **kw))
        with pytest.raises(UnsupportedSchedulerOption, match=list(kw)[0]):
            scheduling.plan(config, 10)


def test_zero_snr_needs_the_class():
    config = dict(diffusers.DDIMScheduler(rescale_betas_zero_snr=True).config)  # no _class_name
    with pytest.raises(UnsupportedSchedulerOption, match="rescale_betas_zero_snr=True"):
        schedules.from_diffusers_config(config)
