"""Consistency distillation (LCM): the skip grid, the objective against the training script's formulas
written out in numpy, the target read from the train state as it is now (a trace-time copy fails),
and teacher guidance that moves toward the condition (a flipped cond / uncond order fails). The
``lcm`` / ``codi`` samplers and the boundary scalings against diffusers' LCMScheduler are in
tests/test_schedulers_parity.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import consistency, schedules, timesteps
from jdistill.objectives.consistency import lcm_loss, teacher_step
from jdistill.recipes import consistency as lcm_recipe
from jdistill.train import engine as engine_lib


def test_skip_grid_is_the_scripts_and_continuous_schedules_read_model_time():
    start, end = consistency.skip_grid(schedules.DiscreteVP.from_betas(), 50)
    np.testing.assert_array_equal(start, np.arange(1, 51) * 20 - 1)  # the script's DDIMSolver timesteps
    np.testing.assert_array_equal(end, np.maximum(start - 20, 0))
    start, end = consistency.skip_grid(schedules.CosineVP(), 50)
    np.testing.assert_allclose(start, np.arange(1, 51) / 50, rtol=1e-6)
    np.testing.assert_allclose(end, np.arange(0, 50) / 50, rtol=1e-6, atol=1e-7)
    # the scalings of a continuous schedule are those of its network's timestep 1000 t
    t = jnp.asarray([0.0, 0.02, 0.5, 1.0])
    for ours, want in zip(consistency.scalings_at(schedules.CosineVP(), t), consistency.boundary_scalings(1000 * t)):
        np.testing.assert_array_equal(ours, want)
    assert consistency.scalings_at(schedules.CosineVP(), 0.0)[0] == 1.0  # the boundary: f(z, 0) = z
    # the LCM sampling grid of a continuous schedule picks from the same unit grid, LCMScheduler's way
    grid = timesteps.make_grid(schedules.CosineVP(), 4, "lcm")
    np.testing.assert_allclose(grid.t, [1.0, 0.76, 0.5, 0.26], rtol=1e-6)
    np.testing.assert_allclose(grid.t_next, [0.76, 0.5, 0.26, 0.0], rtol=1e-6)



def test_quadratic_spacing_picks_remaining_fractions_squared_and_lcm_spacing_is_the_schedulers():
    # quadratic picks on the 50-step grid: remaining fractions (1 - i/4)^2 = 1, 0.5625, 0.25, 0.0625
    grid = timesteps.make_grid(schedules.CosineVP(), 4, "codi", "quadratic")
    np.testing.assert_allclose(grid.t, [1.0, 0.56, 0.24, 0.06], rtol=1e-6)
    np.testing.assert_allclose(grid.t_next, [0.56, 0.24, 0.06, 0.0], rtol=1e-6, atol=1e-7)
    # the same picks on a discrete schedule (k = 20), and "lcm" is LCMScheduler's [999, 759, 499, 259]
    assert timesteps.lcm_timesteps(1000, 4, 50, "quadratic").tolist() == [999, 559, 239, 59]
    assert timesteps.make_grid(schedules.DiscreteVP.from_betas(), 4, "lcm", "lcm").t.tolist() == [999, 759, 499, 259]
    for original in (4, 10, 50):  # every step count: distinct picks, the first at the noisy end, on the grid
        for n in range(1, original + 1):
            picks = timesteps.consistency_picks(n, original, "quadratic")
            assert picks[0] == 0 and picks[-1] < original and np.all(np.diff(picks) > 0), (original, n, picks)
    with pytest.raises(ValueError, match="unknown consistency spacing 'leading'"):
        timesteps.consistency_picks(4, 50, "leading")
    with pytest.raises(ValueError, match="1 <= num_steps"):
        timesteps.consistency_picks(51, 50, "quadratic")
    # the same grid as a custom list of unit times (how a user tries other picks: --timesteps)
    custom = timesteps.make_grid(schedules.CosineVP(), 4, "codi", timesteps=[1.0, 0.56, 0.24, 0.06])
    np.testing.assert_array_equal(custom.t, grid.t)
    np.testing.assert_array_equal(custom.t_next, grid.t_next)
    with pytest.raises(ValueError, match=r"descending unit times in \(0, 1\], got \[999.0, 559.0\]"):
        timesteps.make_grid(schedules.CosineVP(), 2, "codi", timesteps=[999, 559])
    with pytest.raises(ValueError, match="descending unit times"):  # one float32 apart: a zero-length step
        timesteps.make_grid(schedules.CosineVP(), 2, "codi", timesteps=[0.5, 0.49999999])
    with pytest.raises(ValueError, match="custom timesteps on a flow schedule"):
        timesteps.make_grid(schedules.RectifiedFlow(), 2, "codi", timesteps=[1.0, 0.5])


class LinearNet(nn.Module):
    """out = W z + b(t) + e(label) per pixel: a tiny eps / v network with a class table (null row 4)."""

    guidance_embed: bool = False

    @nn.compact
    def __call__(self, x, t, class_labels, guidance=None):
        w = self.param("w", nn.initializers.normal(0.3), (x.shape[-1], x.shape[-1]))
        b = self.param("b", nn.initializers.normal(0.3), (x.shape[-1],))
        table = self.param("table", nn.initializers.normal(1.0), (5,) + x.shape[1:])
        out = x @ w + b * jnp.cos(t / 1000.0)[:, None, None, None] + table[class_labels]
        if self.guidance_embed:
            out = out + self.param("g", nn.initializers.zeros, ()) * guidance[:, None, None, None]
        return out


def linear_setup(prediction="eps", schedule=None):
    schedule = schedule or schedules.DiscreteVP.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    teacher = Denoiser(None, schedule, LinearNet(), prediction, null_cond=NullClass(4))
    x = jnp.zeros((2, 4, 4, 3))
    params = LinearNet().init(jax.random.key(0), x, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))["params"]
    student = teacher.replace(module=LinearNet(guidance_embed=True))
    sparams = dict(params, g=jnp.asarray(0.5))
    return teacher.replace(params=params), student.replace(params=sparams)


def _np(a):
    return np.asarray(a, np.float64)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_lcm_loss_equals_the_training_scripts_formulas(prediction):
    """diffusers' train_lcm_distill_sd_wds.py, one step, in numpy: index -> (start, start - k), noise, w,
    the teacher's cond and uncond passes combined as x = cond + w (cond - uncond), a DDIM step, the
    boundary scalings at timestep scaling 10, the target network's f at the end point, the L2 / Huber loss."""
    teacher, student = linear_setup(prediction)
    target = jax.tree.map(lambda p: p * 0.9, student.params)  # a target average unlike the online params
    batch = {"image": jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-1, maxval=1),
             "label": jnp.asarray([1, 3])}
    rng = jax.random.key(7)
    for distance in ("l2", "huber"):
        loss_fn = lcm_loss(student.replace(params=None), teacher.replace(params=None), num_steps=50,
                           scale_range=(3.0, 9.0), distance=distance, huber_c=0.001)
        got, _ = loss_fn(student.params, {"teacher": teacher.params, "target": target}, batch, rng)
        # the same draws, then the script's arithmetic in float64
        k_t, k_eps, k_g = jax.random.split(rng, 3)
        idx = np.asarray(jax.random.randint(k_t, (2,), 0, 50))
        start = (np.arange(1, 51) * 20 - 1)[idx]
        end = np.maximum(start - 20, 0)
        eps = _np(jax.random.normal(k_eps, (2, 4, 4, 3)))
        w = _np(jax.random.uniform(k_g, (2,), minval=3.0, maxval=9.0)) - 1.0  # LCM's w = g - 1
        ab = _np(teacher.schedule.alphas_cumprod)
        x = _np(batch["image"])
        col = (-1, 1, 1, 1)
        a_t, s_t = np.sqrt(ab[start]).reshape(col), np.sqrt(1 - ab[start]).reshape(col)
        a_s, s_s = np.sqrt(ab[end]).reshape(col), np.sqrt(1 - ab[end]).reshape(col)
        z = a_t * x + s_t * eps

        def net(params, zz, tt, labels, g=None):
            out = zz @ _np(params["w"]) + _np(params["b"]) * np.cos(tt / 1000.0).reshape(col) + _np(params["table"])[labels]
            return out + _np(params["g"]) * g.reshape(col) if g is not None else out

        def x0_eps(out, zz, a, s):
            if prediction == "eps":
                return (zz - s * out) / a, out
            return a * zz - s * out, s * zz + a * out

        cond_x0, cond_eps = x0_eps(net(teacher.params, z, start, np.asarray([1, 3])), z, a_t, s_t)
        unc_x0, unc_eps = x0_eps(net(teacher.params, z, start, np.asarray([4, 4])), z, a_t, s_t)
        x0_hat = cond_x0 + w.reshape(col) * (cond_x0 - unc_x0)
        eps_hat = cond_eps + w.reshape(col) * (cond_eps - unc_eps)
        z_prev = a_s * x0_hat + s_s * eps_hat  # DDIMSolver.ddim_step

        def scalings(t):
            c_skip = 0.25 / ((10.0 * t) ** 2 + 0.25)
            return c_skip.reshape(col), (10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25)).reshape(col)

        g = w + 1.0
        on_x0, _ = x0_eps(net(student.params, z, start, np.asarray([1, 3]), g), z, a_t, s_t)
        c_skip, c_out = scalings(start)
        model_pred = c_skip * z + c_out * on_x0
        tg_x0, _ = x0_eps(net(target, z_prev, end, np.asarray([1, 3]), g), z_prev, a_s, s_s)
        c_skip, c_out = scalings(end)
        tgt = c_skip * z_prev + c_out * tg_x0
        d2 = (model_pred - tgt) ** 2
        want = d2.mean() if distance == "l2" else (np.sqrt(d2 + 0.001**2) - 0.001).mean()
        np.testing.assert_allclose(float(got), want, rtol=2e-4, err_msg=f"{prediction} {distance}")


def test_target_is_the_average_as_it_is_now_and_a_trace_time_copy_fails():
    """The loss each step reports equals the loss computed by hand from the target average of the state
    before that step; reading the target captured when the step was traced (the CoDi reference code's
    bug) gives different losses once the average has moved."""
    teacher, student = linear_setup("v", schedules.CosineVP())
    loss_fn = lcm_loss(student.replace(params=None), teacher.replace(params=None), num_steps=10, scale_range=(1.0, 3.0))
    batch = {"image": jax.random.uniform(jax.random.key(1), (4, 4, 4, 3), minval=-1, maxval=1),
             "label": jnp.asarray([0, 1, 2, 3])}

    loss_by_hand = jax.jit(loss_fn)

    def run(at_trace_time):
        optim = dict(lr=5e-2, warmup=0, decay="constant", clip_norm=0.0)
        engine = lcm_recipe.target_engine(loss_fn, optim, 4, target_decay=0.5)
        state = engine.init({"student": student.params}, jax.random.key(0))
        if at_trace_time:
            frozen_target = engine.average_params(state, "target")
            engine = engine_lib.Engine(engine.parts, [engine_lib.Update(
                "student", loss_fn, lambda s, f: {"teacher": f, "target": frozen_target})], engine.averages)
        step = jax.jit(engine.step)
        reported, by_hand = [], []
        for _ in range(4):
            before = state
            state, metrics = step(state, teacher.params, batch)
            inputs = {"teacher": teacher.params, "target": engine.average_params(before, "target")}
            by_hand.append(float(loss_by_hand(before.params(), inputs, batch, before.step_key())[0]))
            reported.append(float(metrics["loss"]))
        return np.asarray(reported), np.asarray(by_hand)

    reported, by_hand = run(False)
    np.testing.assert_allclose(reported, by_hand, rtol=1e-5)
    reported, by_hand = run(True)
    assert np.allclose(reported[0], by_hand[0], rtol=1e-5)  # identical until the average moves
    assert not np.allclose(reported[1:], by_hand[1:], rtol=1e-3)


class PrototypeNet(nn.Module):
    """An exact denoiser of a point mass per class: eps = (z - a proto[label]) / s (null label 3: the mean)."""

    @nn.compact
    def __call__(self, x, t, class_labels):
        protos = self.param("protos", nn.initializers.normal(1.0), (3,) + x.shape[1:])
        table = jnp.concatenate([protos, protos.mean(0, keepdims=True)])
        a, s = schedules.CosineVP().alpha_sigma(t / 1000.0)
        return (x - a[:, None, None, None] * table[class_labels]) / s[:, None, None, None]


def _toward(teacher, swap: bool):
    """How far the teacher's guided step moves z_s along (proto_c - mean), g = 3 against g = 1."""
    x = jnp.zeros((6, 4, 4, 1))
    z = jax.random.normal(jax.random.key(2), x.shape)
    labels = jnp.asarray([0, 1, 2, 0, 1, 2])
    t, s = jnp.full((6,), 0.6), jnp.full((6,), 0.58)
    cond, uncond = {"class_labels": labels}, {"class_labels": jnp.full((6,), 3)}
    if swap:  # the reference code's order: [cond, uncond] concatenated, split as (uncond, cond)
        cond, uncond = uncond, cond
    protos = teacher.params["protos"]
    direction = protos[labels] - protos.mean(0)
    proj = [jnp.sum(teacher_step(teacher, z, t, s, cond, jnp.full((6,), g), uncond) * direction, axis=(1, 2, 3))
            for g in (1.0, 3.0)]
    return np.asarray(proj[1] - proj[0])


def test_guidance_moves_the_teacher_step_toward_the_condition_and_a_flipped_order_fails():
    module = PrototypeNet()
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    teacher = Denoiser(params["params"], schedules.CosineVP(), module, "eps", null_cond=NullClass(3))
    assert np.all(_toward(teacher, swap=False) > 0)
    assert not np.all(_toward(teacher, swap=True) > 0)


def test_heun_teacher_step_is_second_order():
    """With a prediction that depends on z and t, one Heun step's error against a fine DDIM solution is
    far below one DDIM step's (DDIM is Euler in x = z / a over sigma; Heun adds the second stage)."""
    teacher, _ = linear_setup("v", schedules.CosineVP())
    z = jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
    cond = {"class_labels": jnp.asarray([0, 1])}
    # a short step (LCM's skip is 1/50 of the range): second order shows before the step's curvature does
    t, s = jnp.full((2,), 0.7), jnp.full((2,), 0.68)
    fine = z
    for i in range(100):
        a, b = 0.7 - 0.02 * i / 100, 0.7 - 0.02 * (i + 1) / 100
        fine = teacher_step(teacher, fine, jnp.full((2,), a), jnp.full((2,), b), cond)
    ddim = teacher_step(teacher, z, t, s, cond, solver="ddim")
    heun = teacher_step(teacher, z, t, s, cond, solver="heun")
    assert float(jnp.abs(heun - fine).max()) < 0.2 * float(jnp.abs(ddim - fine).max())


def test_lcm_student_starts_as_the_teacher():
    from jdistill.models import dit

    module = dit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params["params"])
    teacher = Denoiser.for_module(module, schedules.CosineVP(), "v", params)
    student = lcm_recipe.student_template(teacher).replace(params=lcm_recipe.init_student(teacher, 0))
    z, t, y = jax.random.normal(jax.random.key(2), (3, 8, 8, 1)), jnp.asarray([0.1, 0.5, 0.9]), jnp.asarray([1, 2, 10])
    want = teacher.predict(z, t, {"class_labels": y}).x0
    got = student.predict(z, t, {"class_labels": y, "guidance": jnp.asarray([1.0, 2.0, 7.0])}).x0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert optax.global_norm(student.params["guidance_embedder"]) > 0  # a real embedder, its last layer zero


def test_one_rule_names_how_a_network_reads_the_guidance_scale():
    """The objective, the pipelines and the plan ask ``registry.guidance_input_kind``: an SD UNet given
    LCM's fields reads w through ``timestep_cond``, any other student through its ``guidance``
    embedder, and a plain network not at all (it samples with classifier-free guidance)."""
    from jdistill.models import dit, registry
    from jdistill.models.unet_cond import UNet2DConditionModel
    from jdistill.objectives.consistency import guidance_input

    plain_dit = dit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2)
    plain_unet = UNet2DConditionModel()
    assert registry.guidance_input_kind(plain_dit) is None and registry.guidance_input_kind(plain_unet) is None
    lcm_unet = plain_unet.clone(**lcm_recipe.guidance_fields(plain_unet))
    guided_dit = plain_dit.clone(**lcm_recipe.guidance_fields(plain_dit))
    assert registry.guidance_input_kind(lcm_unet) == "timestep_cond"
    assert registry.guidance_input_kind(guided_dit) == "guidance"
    scale = jnp.asarray([1.0, 7.5])
    assert guidance_input(lcm_unet, scale)["timestep_cond"].shape == (2, lcm_recipe.LCM_EMBEDDING_DIM)
    np.testing.assert_array_equal(guidance_input(guided_dit, scale)["guidance"], scale)
