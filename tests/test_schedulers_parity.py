"""The schedulers people pick, run by jdistill and by diffusers over whole trajectories (fp32, <= 1e-5).

As in test_solvers_parity.py: the same analytic "network" on both sides, the same initial noise,
and for stochastic schedulers the same per-step noise (jdistill draws step i's from
fold_in(rng, i); diffusers gets it as ``variance_noise`` or through its ``randn_tensor``).
Every comparison is against diffusers' own output. Each case runs a diffusers class as a pipeline
does (initial noise times ``init_noise_sigma``, ``scale_model_input``, ``step``) and jdistill
through ``pipelines.scheduling.plan`` (the mapper), or through ``make_grid`` + the solver by name
(the low-level path).
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_solvers_parity import SHAPE, make_denoiser, step_noises, torch_analytic

from jdistill.diffusion import consistency, schedules, solvers, timesteps
from jdistill.pipelines import scheduling
from jdistill.sampling import samplers
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
LIGHTNING = [999, 749, 499, 249]


def zero_snr(**kw):
    return {**SD, **ZERO_SNR, **kw}  # SDXL-Lightning / Hyper-SD style 4-step list

# schedulers that draw their step noise with randn_tensor from their own module
_RANDN_MODULES = {
    diffusers.DDPMScheduler: diffusers.schedulers.scheduling_ddpm,
    diffusers.EulerAncestralDiscreteScheduler: diffusers.schedulers.scheduling_euler_ancestral_discrete,
    diffusers.LCMScheduler: diffusers.schedulers.scheduling_lcm,
    diffusers.TCDScheduler: diffusers.schedulers.scheduling_tcd,
}


def config_of(ref) -> dict:
    return {**dict(ref.config), "_class_name": type(ref).__name__}


def run_diffusers(monkeypatch, ref, z0, n=None, custom=None, noises=(), **step_kw):
    """The scheduler's trajectory from unit noise ``z0``; step i's noise is ``noises[i]``;
    ``step_kw``: what a pipeline passes its ``step`` (TCD's eta)."""
    ref.set_timesteps(timesteps=list(custom)) if custom is not None else ref.set_timesteps(n)
    feed = iter(noises)
    if type(ref) in _RANDN_MODULES:
        monkeypatch.setattr(_RANDN_MODULES[type(ref)], "randn_tensor",
                            lambda shape, **kw: torch.from_numpy(nchw(next(feed))))
    sde = getattr(ref.config, "algorithm_type", None) == "sde-dpmsolver++"
    x = torch.from_numpy(nchw(z0)) * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        out = torch_analytic(ref.scale_model_input(x, t), float(t))
        kw = {"variance_noise": torch.from_numpy(nchw(noises[i]))} if sde else {}
        x = ref.step(out, t, x, **kw, **step_kw).prev_sample
    return nhwc(x.numpy())


def run_plan(config, z0, n, key, solver=None, custom=None, **call_options):
    """jdistill through the mapper, as TextToImage samples: noise scale, solver options, final scale;
    ``call_options``: what the caller adds (TCD's eta)."""
    plan = scheduling.plan(config, n, solver, timesteps=custom)
    den = make_denoiser(scheduling.schedule_from_config(config), scheduling.prediction_type(config))
    z = samplers.sample_jit(den, jnp.asarray(z0) * plan.noise_scale, grid=plan.grid, solver=plan.solver, rng=key,
                            **plan.sample_options(), **call_options)
    return np.asarray(z) * plan.final_scale, plan


def unit_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


# ------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("cls", [diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.LCMScheduler,
                                 diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler,
                                 diffusers.EulerAncestralDiscreteScheduler, diffusers.UniPCMultistepScheduler])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_snr_alphas_cumprod_match_diffusers(cls, beta_schedule):
    ref = cls(beta_schedule=beta_schedule, rescale_betas_zero_snr=True)
    schedule = schedules.from_diffusers_config(config_of(ref))
    expected = ref.alphas_cumprod.numpy()
    assert_close(schedule.alphas_cumprod, expected, 1e-6, "zero-SNR alphas_cumprod")
    # the last one exactly: 0 (DDIM / DDPM / LCM) or 2**-24 (the sigma-stepping classes)
    assert float(schedule.alphas_cumprod[-1]) == float(expected[-1])
    assert schedules.diffusers_alphas_cumprod(config_of(ref))[-1] == expected[-1]


# ------------------------------------------------------------------------------- through the mapper

PLAN_CASES = [
    # DPM-Solver++: Karras sigmas, heun, order 1, sigma_min (second-order last step from 15 steps on)
    (diffusers.DPMSolverMultistepScheduler, dict(SD, use_karras_sigmas=True), 20, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 8, None),
    (diffusers.DPMSolverMultistepScheduler, dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True), 3, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, solver_type="heun"), 20, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, solver_type="heun", use_karras_sigmas=True,
                                                 timestep_spacing="trailing"), 10, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, solver_order=1), 10, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, final_sigmas_type="sigma_min"), 8, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, final_sigmas_type="sigma_min"), 20, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, final_sigmas_type="sigma_min", use_karras_sigmas=True), 20, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, final_sigmas_type="sigma_min", euler_at_final=True), 20, None),
    # DPM-Solver++ SDE, seeded
    (diffusers.DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++"), 20, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++", solver_order=1), 12, None),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++", solver_type="heun",
                                                 use_karras_sigmas=True, prediction_type="v_prediction"), 12, None),
    # Euler: linspace between integer timesteps, Karras sigmas (+ config sigma range), sigma_min
    (diffusers.EulerDiscreteScheduler, dict(SD), 20, None),
    (diffusers.EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True), 20, None),
    (diffusers.EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1,
                                            prediction_type="v_prediction"), 12, None),
    (diffusers.EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 10, None),
    (diffusers.EulerDiscreteScheduler, dict(SD, final_sigmas_type="sigma_min", timestep_spacing="trailing"), 10, None),
    (diffusers.EulerDiscreteScheduler, dict(SD, final_sigmas_type="sigma_min", use_karras_sigmas=True), 10, None),
    # Euler ancestral (seeded), Heun (two model calls a step)
    (diffusers.EulerAncestralDiscreteScheduler, dict(SD), 20, None),
    (diffusers.EulerAncestralDiscreteScheduler, dict(SD, timestep_spacing="trailing",
                                                     prediction_type="v_prediction"), 8, None),
    (diffusers.EulerAncestralDiscreteScheduler, dict(SD, timestep_spacing="leading", steps_offset=1), 10, None),
    (diffusers.HeunDiscreteScheduler, dict(SD), 10, None),
    (diffusers.HeunDiscreteScheduler, dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 10, None),
    (diffusers.HeunDiscreteScheduler, dict(SD, timestep_spacing="leading", steps_offset=1, clip_sample=True,
                                           clip_sample_range=0.5), 10, None),
    # UniPC: bh2 order 2 (SDXL's), orders 1 and 3, bh1, Karras, sigma_min without lower-order final
    (diffusers.UniPCMultistepScheduler, dict(SD), 20, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"), 6, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, solver_order=3), 20, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, solver_order=1), 10, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, solver_type="bh1", final_sigmas_type="sigma_min",
                                             solver_order=3), 10, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, use_karras_sigmas=True), 12, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, use_karras_sigmas=True, sigma_min=0.05, sigma_max=8.0,
                                             final_sigmas_type="sigma_min"), 8, None),
    (diffusers.UniPCMultistepScheduler, dict(SD, final_sigmas_type="sigma_min", lower_order_final=False), 12, None),
    # zero terminal SNR with trailing spacing (v-prediction, the pairing the rescale asks for)
    (diffusers.DDIMScheduler, zero_snr(clip_sample=False), 10, None),
    (diffusers.DDPMScheduler, zero_snr(clip_sample=False), 10, None),
    (diffusers.DPMSolverMultistepScheduler, zero_snr(), 10, None),
    (diffusers.DPMSolverMultistepScheduler, zero_snr(prediction_type="epsilon"), 10, None),
    (diffusers.EulerDiscreteScheduler, zero_snr(timestep_spacing="leading", steps_offset=1), 10, None),
    (diffusers.EulerDiscreteScheduler, zero_snr(prediction_type="epsilon"), 10, None),
    (diffusers.EulerAncestralDiscreteScheduler, zero_snr(), 10, None),
    (diffusers.UniPCMultistepScheduler, zero_snr(), 10, None),
    (diffusers.LCMScheduler, dict(ZERO_SNR), 4, None),
    # distilled students' timesteps: trailing spacing and custom lists
    (diffusers.DDIMScheduler, dict(SD, timestep_spacing="trailing", clip_sample=False), 4, None),
    (diffusers.EulerDiscreteScheduler, dict(SD, timestep_spacing="trailing"), 4, None),
    (diffusers.DDPMScheduler, dict(SD, clip_sample=False), None, LIGHTNING),
    (diffusers.DPMSolverMultistepScheduler, dict(SD), None, LIGHTNING),
    (diffusers.DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++"), None, LIGHTNING),
    (diffusers.EulerDiscreteScheduler, dict(SD), None, LIGHTNING),
    (diffusers.EulerDiscreteScheduler, dict(SD), None, [999.0, 850.5, 500.25, 100.75]),
    (diffusers.HeunDiscreteScheduler, dict(SD), None, LIGHTNING),
    (diffusers.LCMScheduler, dict(), None, [999, 759, 499, 259]),
    # LCM multistep consistency sampling
    (diffusers.LCMScheduler, dict(), 1, None),
    (diffusers.LCMScheduler, dict(), 2, None),
    (diffusers.LCMScheduler, dict(), 4, None),
    (diffusers.LCMScheduler, dict(), 8, None),
    (diffusers.LCMScheduler, dict(prediction_type="v_prediction", clip_sample=True), 4, None),
    (diffusers.LCMScheduler, dict(original_inference_steps=100, timestep_scaling=5.0), 8, None),
]


def _case_id(case):
    cls, kw, n, custom = case
    opts = ",".join(f"{k}={v}" for k, v in kw.items() if k not in SD)
    return f"{cls.__name__}[{opts}]-{n if custom is None else custom}"


@pytest.mark.parametrize("case", PLAN_CASES, ids=[_case_id(c) for c in PLAN_CASES])
def test_plan_trajectory_matches_diffusers(monkeypatch, case):
    cls, kw, n, custom = case
    ref = cls(**kw)
    z0, key = unit_noise(), jax.random.key(11)
    ours, plan = run_plan(config_of(ref), z0, n, key, custom=custom)
    expected = run_diffusers(monkeypatch, ref, z0, n, custom, step_noises(key, plan.num_steps))
    assert_close(ours, expected, TOL, _case_id(case))


def test_named_solver_samples_as_its_class_from_config(monkeypatch):
    """A solver named for another class's config: as ``TheClass.from_config(config)`` samples."""
    euler = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    z0, key = unit_noise(2), jax.random.key(4)
    for solver, cls in [("dpmpp_sde", diffusers.DPMSolverMultistepScheduler), ("unipc", diffusers.UniPCMultistepScheduler),
                        ("heun", diffusers.HeunDiscreteScheduler)]:
        kw = {"algorithm_type": "sde-dpmsolver++"} if solver == "dpmpp_sde" else {}
        ref = cls.from_config(euler.config, **kw)  # Karras sigmas carried over
        ours, plan = run_plan(config_of(euler), z0, 9, key, solver=solver)
        assert plan.solver == solver and plan.grid.sigma is not None
        expected = run_diffusers(monkeypatch, ref, z0, 9, None, step_noises(key, 9))
        assert_close(ours, expected, TOL, f"{solver} from an Euler Karras config")


def test_a_named_solver_drops_the_used_defaults_as_from_config_does(monkeypatch):
    """A live scheduler's config lists the keys its class filled with defaults; another class built
    ``from_config`` takes its own defaults for them (DDIM's 'leading' spacing becomes DPMSolver's
    'linspace'), and so does the plan."""
    ddim = diffusers.DDIMScheduler(**SD)
    assert "timestep_spacing" in ddim.config._use_default_values
    ref = diffusers.DPMSolverMultistepScheduler.from_config(ddim.config)
    assert ref.config.timestep_spacing == "linspace"
    z0, key = unit_noise(3), jax.random.key(5)
    ours, plan = run_plan(config_of(ddim), z0, 9, key, solver="dpmpp_2m")
    assert_close(ours, run_diffusers(monkeypatch, ref, z0, 9), TOL, "dpmpp_2m from a DDIM config's used defaults")


# ------------------------------------------------------------------------------- low-level path


LOW_LEVEL_CASES = [
    # solver, diffusers scheduler it stands for, config, steps, custom timesteps
    ("dpmpp_sde", diffusers.DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++"), 10, None),
    ("euler_ancestral", diffusers.EulerAncestralDiscreteScheduler, dict(SD), 10, None),
    ("heun", diffusers.HeunDiscreteScheduler, dict(SD), 10, None),
    ("unipc", diffusers.UniPCMultistepScheduler, dict(SD), 10, None),
    ("lcm", diffusers.LCMScheduler, dict(), 4, None),
    ("ddpm", diffusers.DDPMScheduler, dict(SD, clip_sample=False), None, LIGHTNING),
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, dict(SD), None, LIGHTNING),
    ("heun", diffusers.HeunDiscreteScheduler, dict(SD), None, LIGHTNING),
    ("lcm", diffusers.LCMScheduler, dict(), None, LIGHTNING),
    # zero SNR built into the schedule: from_diffusers_config + make_grid alone are exact
    ("ddim", diffusers.DDIMScheduler, zero_snr(clip_sample=False, set_alpha_to_one=False), 10, None),
    ("ddpm", diffusers.DDPMScheduler, zero_snr(clip_sample=False), 10, None),
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, zero_snr(), 10, None),
    ("unipc", diffusers.UniPCMultistepScheduler, zero_snr(), 10, None),
]


@pytest.mark.parametrize("solver,cls,kw,n,custom", LOW_LEVEL_CASES,
                         ids=[f"{c[0]}-{'zero_snr' if 'rescale_betas_zero_snr' in c[2] else c[3] or 'custom'}"
                              for c in LOW_LEVEL_CASES])
def test_make_grid_and_solver_match_diffusers(monkeypatch, solver, cls, kw, n, custom):
    """``schedules.from_diffusers_config`` + ``timesteps.make_grid`` + the solver by name."""
    ref = cls(**kw)
    config = config_of(ref)
    config.pop("algorithm_type", None) if solver == "dpmpp_sde" else None  # named by the solver instead
    schedule = schedules.from_diffusers_config(config)
    grid = timesteps.make_grid(schedule, n, solver, spacing=kw.get("timestep_spacing"),
                               set_alpha_to_one=kw.get("set_alpha_to_one", True), timesteps=custom)
    z0, key = unit_noise(1), jax.random.key(5)
    # Euler-type schedulers start from unit noise times sigma_max in x = z / a, which is s_max in z
    scale = float(solvers.vp_from_sigma(grid.sigma[0])[1]) if grid.sigma is not None else 1.0
    ours = samplers.sample_jit(make_denoiser(schedule, scheduling.prediction_type(config)), jnp.asarray(z0) * scale,
                               grid=grid, solver=solver, rng=key)
    expected = run_diffusers(monkeypatch, ref, z0, n, custom, step_noises(key, grid.num_steps))
    assert_close(ours, expected, TOL, f"{solver} via make_grid")


# ------------------------------------------------------------------------------- TCD


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_tcd_trajectory_matches_diffusers(monkeypatch, n, eta):
    """TCDScheduler (Hyper-SD's one-step sampler, eta = gamma) through the mapper: LCM's timesteps,
    a DDIM step to floor((1 - eta) t_next), re-noised to t_next with the fed noise but on the last
    step, which lands on timestep 0."""
    ref = diffusers.TCDScheduler(**SD)
    z0, key = unit_noise(4), jax.random.key(7)
    ours, plan = run_plan(config_of(ref), z0, n, key, eta=eta)
    assert plan.solver == "tcd" and int(plan.grid.t_next[-1]) == 0
    # diffusers draws noise on every step but the last, and only with eta > 0
    noises = step_noises(key, n - 1) if eta > 0 else ()
    expected = run_diffusers(monkeypatch, ref, z0, n, None, noises, eta=eta)
    assert_close(ours, expected, TOL, f"TCD, {n} steps, eta {eta}")
    if n > 1 and eta > 0:  # the noise is used: a different key gives other latents
        other, _ = run_plan(config_of(ref), z0, n, jax.random.key(8), eta=eta)
        assert np.abs(other - ours).max() > 1e-3


@pytest.mark.parametrize("kw,n,custom,eta", [
    (dict(SD), None, [800], 1.0),  # Hyper-SD's published one step
    (dict(SD), None, [999, 700, 333], 0.5),
    (dict(SD, original_inference_steps=100, prediction_type="v_prediction"), 8, None, 0.3),
    (dict(ZERO_SNR, prediction_type="v_prediction"), 4, None, 0.3),
], ids=["one-step-800", "custom", "v-orig100", "zero-snr"])
def test_tcd_options_match_diffusers(monkeypatch, kw, n, custom, eta):
    ref = diffusers.TCDScheduler(**kw)
    z0, key = unit_noise(5), jax.random.key(9)
    ours, plan = run_plan(config_of(ref), z0, n, key, custom=custom, eta=eta)
    expected = run_diffusers(monkeypatch, ref, z0, n, custom, step_noises(key, plan.num_steps - 1), eta=eta)
    assert_close(ours, expected, TOL, f"TCD {kw} {n or custom} eta {eta}")


# ------------------------------------------------------------------------------- LCM and CoDi


def test_boundary_scalings_match_lcm_scheduler():
    """diffusers passes the integer timestep (not a scaled one) and scales it by timestep_scaling inside."""
    for scaling in (10.0, 5.0):
        ref = diffusers.LCMScheduler(timestep_scaling=scaling)
        t = torch.arange(1000)
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)
        ours = consistency.boundary_scalings(jnp.arange(1000), timestep_scaling=scaling)
        assert_close(ours[0], c_skip.numpy(), 1e-6, "c_skip")
        assert_close(ours[1], c_out.numpy(), 1e-6, "c_out")


@pytest.mark.parametrize("scaling", [10.0, 5.0])
def test_consistency_fn_is_lcm_schedulers_denoised(scaling):
    """f(z, t) = c_skip z + c_out x0 against ``LCMScheduler.step(...).denoised`` at every timestep
    of a 4-step schedule, x0 taken from the step's own eps-prediction formula (written out)."""
    ref = diffusers.LCMScheduler(timestep_scaling=scaling)
    ref.set_timesteps(4)
    ab = ref.alphas_cumprod.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    for t in ref.timesteps:
        z, out = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
        denoised = ref.step(torch.from_numpy(nchw(out)), t, torch.from_numpy(nchw(z)),
                            generator=torch.Generator().manual_seed(0)).denoised
        x0 = (z - np.sqrt(1 - ab[int(t)]) * out) / np.sqrt(ab[int(t)])
        ours = consistency.consistency_fn(jnp.asarray(z), jnp.asarray(x0, jnp.float32), jnp.full((SHAPE[0],), int(t)),
                                          timestep_scaling=scaling)
        assert_close(ours, nhwc(denoised.numpy()), TOL, f"f(z, {int(t)})")


@pytest.mark.parametrize("original", [50, 100])
def test_lcm_timesteps_match_diffusers(original):
    ref = diffusers.LCMScheduler(original_inference_steps=original)
    for n in (1, 2, 3, 4, 7, 8, 25, original):
        ref.set_timesteps(n)
        grid = timesteps.make_grid(schedules.from_diffusers_config(config_of(ref)), n, "lcm",
                                   original_inference_steps=original)
        np.testing.assert_array_equal(np.asarray(grid.t), ref.timesteps.numpy())
    assert list(timesteps.lcm_timesteps(1000, 4)) == [999, 759, 499, 259]


@pytest.mark.parametrize("n,prediction", [(1, "eps"), (4, "eps"), (8, "v")])
def test_codi_matches_its_formula(n, prediction):
    """CoDi's deterministic sampler, z <- a_s (c_skip z + c_out x0) + s_s eps on the LCM grid,
    against the formula written out in numpy on diffusers' alpha_bar table and grid."""
    ref = diffusers.LCMScheduler()
    ref.set_timesteps(n)
    ab = ref.alphas_cumprod.numpy().astype(np.float64)
    ts = [int(t) for t in ref.timesteps]
    z = unit_noise(3).astype(np.float64)
    for t, t_next in zip(ts, ts[1:] + [-1]):
        out = torch_analytic(torch.from_numpy(nchw(z)), float(t)).numpy()
        out = nhwc(out)
        a, s = np.sqrt(ab[t]), np.sqrt(1 - ab[t])
        x0, eps = ((z - s * out) / a, out) if prediction == "eps" else (a * z - s * out, s * z + a * out)
        c_skip = 0.25 / ((10.0 * t) ** 2 + 0.25)
        c_out = 10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25)
        a_n, s_n = (np.sqrt(ab[t_next]), np.sqrt(1 - ab[t_next])) if t_next >= 0 else (1.0, 0.0)
        z = a_n * (c_skip * z + c_out * x0) + s_n * eps
    schedule = schedules.from_diffusers_config(config_of(ref))
    grid = timesteps.make_grid(schedule, n, "codi")
    ours = samplers.sample_jit(make_denoiser(schedule, prediction), jnp.asarray(unit_noise(3)), grid=grid,
                               solver="codi")
    assert_close(ours, z, TOL, f"CoDi {n} steps")


@pytest.mark.parametrize("solver,cls,kw", [
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {}),
    ("dpmpp_sde", diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc", diffusers.UniPCMultistepScheduler, {}),
])
@pytest.mark.parametrize("shift,n", [(3.0, 4), (3.0, 12), (1.0, 7), (3.0, 20)])
def test_multistep_solvers_on_a_flow_schedule_step_as_diffusers_flow_sigmas(monkeypatch, solver, cls, kw, shift, n):
    """A flow model sampled with DPM-Solver++ / UniPC by name (``make_grid``): the class with
    ``use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction"``: its own sigma
    list, not FlowMatchEuler's, and the network at its integer timesteps."""
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = schedules.from_diffusers_config(config_of(euler))
    ref = cls(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction", **kw)
    grid = timesteps.make_grid(schedule, n, solver)
    z0, key = unit_noise(5), jax.random.key(6)
    expected = run_diffusers(monkeypatch, ref, z0, n, None, step_noises(key, n))
    assert_close(np.asarray(schedule.model_time(grid.t)), ref.timesteps.numpy(), 1e-4, "integer timesteps")
    assert_close(grid.sigma, ref.sigmas.numpy()[:-1], 1e-7, "sigmas")
    ours = samplers.sample_jit(make_denoiser(schedule, "flow"), jnp.asarray(z0), grid=grid, solver=solver, rng=key)
    assert_close(ours, expected, TOL, f"{solver} on flow sigmas")


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_sde", "unipc"])
def test_flow_configs_through_the_mapper_sample_as_the_multistep_class_on_flow_sigmas(monkeypatch, solver):
    """SD3's FlowMatchEuler config with a multistep solver named, and that class's own config with
    ``use_flow_sigmas=True``: both as diffusers' class with flow sigmas, flow_shift = the shift."""
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    cls = diffusers.UniPCMultistepScheduler if solver == "unipc" else diffusers.DPMSolverMultistepScheduler
    kw = {"algorithm_type": "sde-dpmsolver++"} if solver == "dpmpp_sde" else {}
    z0, key = unit_noise(7), jax.random.key(8)
    ref = cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", **kw)
    expected = run_diffusers(monkeypatch, ref, z0, 9, None, step_noises(key, 9))
    for config, named in ((config_of(euler), solver), (config_of(ref), None)):
        ours, plan = run_plan(config, z0, 9, key, solver=named)
        assert plan.solver == solver and scheduling.prediction_type(config) == "flow"
        assert_close(ours, expected, TOL, f"{solver} on flow sigmas from {config['_class_name']}")
