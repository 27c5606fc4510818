"""T-Stitch routing: which model serves which step, how often each is called, and the
degenerate fractions reproducing the single models bit for bit."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules, timesteps
from jdistill.sampling import samplers, stitch

CALLS = collections.defaultdict(list)


class Recorded(nn.Module):
    """An analytic eps-predictor that records (on the host) every time it is called."""

    tag: str
    gain: float

    def __call__(self, z, t):
        jax.debug.callback(lambda tt: CALLS[self.tag].append(float(np.asarray(tt)[0])), t)
        return self.gain * jnp.sin(z + t[:, None, None, None] / 1000.0)


def den(tag, gain, schedule, prediction="eps"):
    return Denoiser(params={}, schedule=schedule, module=Recorded(tag, gain), prediction=prediction)


DISCRETE = schedules.DiscreteVP.from_betas("linear")
NOISE = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


@pytest.mark.parametrize("solver,spacing,n", [("ddim", "trailing", 16), ("ddpm", "leading", 20),
                                              ("dpmpp_2m", "linspace", 12)])
def test_endpoints_equal_single_models_bit_for_bit(solver, spacing, n):
    small, large = den("small", 0.5, DISCRETE), den("large", 0.9, DISCRETE)
    grid = timesteps.make_grid(DISCRETE, n, solver, spacing=spacing)
    key = jax.random.key(1)
    for r, alone in ((0.0, large), (1.0, small)):
        got = stitch.sample([small, large], [r, 1 - r], NOISE, grid=grid, solver=solver, rng=key)
        ref = samplers.sample_jit(alone, NOISE, grid=grid, solver=solver, rng=key)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("solver,spacing,n,r", [("ddim", "leading", 50, 0.4), ("ddim", "trailing", 16, 0.75),
                                                ("ddpm", "linspace", 25, 0.4), ("ddpm", "trailing", 10, 0.3),
                                                ("dpmpp_2m", "linspace", 20, 0.4), ("dpmpp_2m", "trailing", 7, 0.75)])
def test_switch_happens_at_the_timestep_fraction(solver, spacing, n, r):
    small, large = den("small", 0.5, DISCRETE), den("large", 0.9, DISCRETE)
    grid = timesteps.make_grid(DISCRETE, n, solver, spacing=spacing)
    stitch.sample([small, large], [r, 1 - r], NOISE, grid=grid, solver=solver, rng=jax.random.key(2))
    boundary = (1 - r) * 1000
    assert CALLS["small"] and all(t >= boundary for t in CALLS["small"]), (CALLS["small"], boundary)
    assert CALLS["large"] and all(t < boundary for t in CALLS["large"]), (CALLS["large"], boundary)
    # every grid step was served exactly once, in order
    np.testing.assert_array_equal(CALLS["small"] + CALLS["large"], np.asarray(grid.t, np.float64))


def test_three_models_route_by_bands_and_call_counts_match_fractions():
    models = [den("s", 0.3, DISCRETE), den("m", 0.6, DISCRETE), den("l", 0.9, DISCRETE)]
    grid = timesteps.make_grid(DISCRETE, 100, "ddim", spacing="trailing")  # t = 999, 989, ..., 9
    fractions = [0.2, 0.3, 0.5]
    p = stitch.plan(grid, DISCRETE, fractions)
    assert p.calls() == [20, 30, 50]
    stitch.sample(models, fractions, NOISE, grid=grid, solver="ddim")
    assert [len(CALLS[k]) for k in "sml"] == [20, 30, 50]
    assert min(CALLS["s"]) >= 800 and max(CALLS["m"]) < 800 and min(CALLS["m"]) >= 500 and max(CALLS["l"]) < 500


def test_zero_fraction_on_a_continuous_grid_gives_the_small_model_nothing():
    cosine = schedules.CosineVP()
    grid = timesteps.make_grid(cosine, 8, "ddim")  # starts at t = 1.0 exactly
    assert stitch.plan(grid, cosine, [0.0, 1.0]).calls() == [0, 8]
    assert stitch.plan(grid, cosine, [0.25, 0.0, 0.75]).calls() == [3, 0, 5]  # t / T >= 0.75: 1, 0.875, 0.75
    assert stitch.plan(grid, cosine, [1.0, 0.0]).calls() == [8, 0]
    # a boundary time float32 cannot hold (0.7 is 0.69999999) still counts as reached: t >= 1 - r
    ten = timesteps.make_grid(cosine, 10, "ddim")  # 1.0, 0.9, ..., 0.1
    assert [stitch.plan(ten, cosine, [r, 1.0 - r]).calls()[0] for r in (0.2, 0.3, 0.4, 0.6, 0.7)] == [3, 4, 5, 7, 8]


def test_step_mode_counts_floor_r_n_small_steps_as_the_reference_does():
    grid = timesteps.make_grid(DISCRETE, 10, "ddim")
    assert [stitch.plan(grid, DISCRETE, [r, 1.0 - r], "step").calls()[0] for r in (0.15, 0.25, 0.35, 0.45, 0.29)] \
        == [1, 2, 3, 4, 2]
    hundred = timesteps.make_grid(DISCRETE, 100, "ddim")
    assert stitch.plan(hundred, DISCRETE, [0.29, 0.71], "step").calls() == [29, 71]  # 0.29 x 100 = 28.999...


def test_step_mode_splits_the_counter():
    models = [den("s", 0.3, DISCRETE), den("l", 0.9, DISCRETE)]
    grid = timesteps.make_grid(DISCRETE, 10, "dpmpp_2m")  # linspace: unequal timestep gaps
    stitch.sample(models, [0.4, 0.6], NOISE, grid=grid, solver="dpmpp_2m", mode="step")
    assert [len(CALLS[k]) for k in "sl"] == [4, 6]


def test_models_on_different_time_units_are_retimed_by_logsnr():
    """A continuous-time cosine model stitched onto a discrete grid sees its own time for the same noise level."""
    cosine = schedules.CosineVP()
    small = den("cos", 0.5, cosine)
    large = den("disc", 0.9, DISCRETE)
    grid = timesteps.make_grid(DISCRETE, 10, "ddim", spacing="trailing")
    stitch.sample([small, large], [0.5, 0.5], NOISE, grid=grid, solver="ddim")
    seen = np.array(CALLS["cos"]) / 1000.0  # the cosine model's time input is 1000 t
    expected = cosine.t_from_logsnr(DISCRETE.logsnr(grid.t[:5]))
    np.testing.assert_allclose(seen, expected, rtol=1e-4, atol=1e-5)


def test_bad_fractions_are_refused():
    models = [den("s", 0.3, DISCRETE), den("l", 0.9, DISCRETE)]
    grid = timesteps.make_grid(DISCRETE, 10, "ddim")
    with pytest.raises(ValueError, match="sum to 1"):
        stitch.sample(models, [0.5, 0.6], NOISE, grid=grid)
    with pytest.raises(ValueError, match="2 denoisers but 3 fractions"):
        stitch.sample(models, [0.2, 0.3, 0.5], NOISE, grid=grid)
    with pytest.raises(ValueError, match="rectified-flow"):
        stitch.sample([den("f", 0.3, schedules.RectifiedFlow(), "flow"), models[1]], [0.5, 0.5], NOISE, grid=grid)


def test_flow_models_stitch_under_euler():
    flow = schedules.RectifiedFlow(shift=3.0)
    small, large = den("small", 0.5, flow, "flow"), den("large", 0.9, flow, "flow")
    grid = timesteps.make_grid(flow, 12, "euler")
    for r, alone in ((0.0, large), (1.0, small)):
        got = stitch.sample([small, large], [r, 1 - r], NOISE, grid=grid, solver="euler")
        np.testing.assert_array_equal(np.asarray(got), np.asarray(samplers.sample_jit(alone, NOISE, grid=grid,
                                                                                      solver="euler")))
    CALLS.clear()
    stitch.sample([small, large], [0.4, 0.6], NOISE, grid=grid, solver="euler")
    assert all(t >= 600 for t in CALLS["small"]) and all(t < 600 for t in CALLS["large"])  # model time = 1000 t


class GuidedInput(nn.Module):
    """A distilled student's shape of call: the guidance scale is an input, not CFG."""

    def __call__(self, z, t, class_labels, guidance):
        jax.debug.callback(lambda g: CALLS["student_g"].append(float(np.asarray(g)[0])), guidance)
        return 0.3 * jnp.sin(z) * guidance[:, None, None, None] + 0.01 * class_labels[:, None, None, None]


class ClassCond(nn.Module):
    def __call__(self, z, t, class_labels):
        jax.debug.callback(lambda y: CALLS["teacher_labels"].append(np.asarray(y).tolist()), class_labels)
        return 0.9 * jnp.sin(z + t[:, None, None, None] / 1000.0) + 0.02 * class_labels[:, None, None, None]


def test_a_guidance_input_student_stitches_before_a_cfg_teacher():
    from jdistill.denoiser import NullClass

    student = Denoiser(params={}, schedule=DISCRETE, module=GuidedInput(), prediction="eps")
    teacher = Denoiser(params={}, schedule=DISCRETE, module=ClassCond(), prediction="eps", null_cond=NullClass(10))
    grid = timesteps.make_grid(DISCRETE, 10, "ddim", spacing="trailing")
    labels = jnp.array([3, 7])
    conds = [{"class_labels": labels, "guidance": jnp.full((2,), 2.5)}, {"class_labels": labels}]
    out = stitch.sample([student, teacher], [0.3, 0.7], NOISE, conds, grid=grid, solver="ddim",
                        guidance_scales=[None, 2.5])
    assert CALLS["student_g"] == [2.5] * 3  # one pass per step, the scale as an input
    # the teacher runs CFG: each call sees the labels and the null class together (a 2B batch)
    assert CALLS["teacher_labels"] == [[3, 7, 10, 10]] * 7
    assert np.isfinite(np.asarray(out)).all()
