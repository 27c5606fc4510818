"""The stage-2 (progressive distillation) target against an exact two-step DDIM computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules
from jdistill.objectives.progressive import step_times, two_step_target
from jdistill.testing import assert_close


class NonlinearV(nn.Module):
    """A fixed nonlinear v-predictor, so the two teacher steps do not collapse into one."""

    def __call__(self, z, t, class_labels):
        tt = t[:, None, None, None] / 1000.0
        return jnp.tanh(1.7 * z * (1.0 + tt)) - 0.3 * tt + 0.05 * class_labels[:, None, None, None]


def make_teacher(schedule):
    """v-prediction on VP schedules; on a flow schedule the same net's output read as a velocity."""
    prediction = "flow" if isinstance(schedule, schedules.RectifiedFlow) else "v"
    return Denoiser(params={}, schedule=schedule, module=NonlinearV(), prediction=prediction)


def exact_two_ddim_steps(teacher, z, t0, t1, t2, cond):
    """Two deterministic DDIM steps written out from the definitions z_s = a_s x + s_s eps."""
    for ta, tb in ((t0, t1), (t1, t2)):
        p = teacher.predict(z, ta, cond)
        a_b, s_b = teacher.alpha_sigma(tb, z)
        z = a_b * p.x0 + s_b * p.eps
    return z


@pytest.mark.parametrize("schedule", [schedules.CosineVP(), schedules.DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012),
                                      schedules.RectifiedFlow(shift=3.0)],
                         ids=["cosine", "discrete", "flow"])
def test_target_is_one_ddim_step_onto_the_teachers_two(schedule):
    teacher = make_teacher(schedule)
    n_student = 4
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((6, 5, 5, 2)), jnp.float32)
    i = jnp.array([4, 3, 2, 4, 3, 2])  # not the last step (i = 1) here
    cond = {"class_labels": jnp.arange(6)}
    t, t_mid, t_end = step_times(schedule, i, n_student)
    x_tilde = two_step_target(teacher, z, t, t_mid, t_end, cond, i == 1)

    z_end = exact_two_ddim_steps(teacher, z, t, t_mid, t_end, cond)
    a_t, s_t = teacher.alpha_sigma(t, z)
    a_e, s_e = teacher.alpha_sigma(t_end, z)
    eps_tilde = (z - a_t * x_tilde) / s_t
    one_step = a_e * x_tilde + s_e * eps_tilde
    assert_close(one_step, z_end, 2e-5, "one student step vs two teacher steps")

    # the trap of an abandoned port: t' and t'' swapped gives a target that misses z_end
    swapped = two_step_target(teacher, z, t, t_end, t_mid, cond, i == 1)
    miss = a_e * swapped + s_e * (z - a_t * swapped) / s_t
    assert float(jnp.max(jnp.abs(miss - z_end))) > 1e-2


@pytest.mark.parametrize("schedule", [schedules.CosineVP(), schedules.RectifiedFlow(shift=3.0)], ids=["cosine", "flow"])
def test_last_step_target_is_the_teachers_x_at_the_midpoint(schedule):
    teacher = make_teacher(schedule)
    z = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
    i = jnp.array([1, 1, 1])
    cond = {"class_labels": jnp.zeros(3, jnp.int32)}
    t, t_mid, t_end = step_times(schedule, i, 8)
    assert np.allclose(t_end, 0.0)
    x_tilde = two_step_target(teacher, z, t, t_mid, t_end, cond, i == 1)
    p1 = teacher.predict(z, t, cond)
    a_t, s_t = teacher.alpha_sigma(t, z)
    a_m, s_m = teacher.alpha_sigma(t_mid, z)
    x_mid = teacher.predict(a_m * p1.x0 + s_m * p1.eps, t_mid, cond).x0
    np.testing.assert_allclose(x_tilde, x_mid, rtol=1e-6, atol=1e-6)


def test_step_times_halve_the_grid():
    s = schedules.CosineVP()
    t, tm, te = step_times(s, jnp.array([8, 1]), 8)
    np.testing.assert_allclose(np.stack([t, tm, te]), [[1.0, 1 / 8], [1 - 1 / 16, 1 / 16], [1 - 1 / 8, 0.0]], atol=1e-7)
    d = schedules.DiscreteVP.from_betas("linear")
    t, tm, te = step_times(d, jnp.array([4]), 4)
    np.testing.assert_allclose(np.stack([t, tm, te]).ravel(), [999.0, 874.0, 749.0])
    # a flow student's grid is sigma = i / N: the unshifted unit grid, which its sampler (unit_grid) runs
    t, tm, te = step_times(schedules.RectifiedFlow(shift=3.0), jnp.array([4, 1]), 4)
    np.testing.assert_allclose(np.stack([t, tm, te]), [[1.0, 0.25], [0.875, 0.125], [0.75, 0.0]], atol=1e-7)
