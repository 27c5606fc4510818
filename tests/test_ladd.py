"""LADD: the losses against their closed forms, the re-noising draws against their distribution,
where gradients go (the generator's through the frozen teacher into x_hat, none between D and G,
none into the teacher), the D:G ratio, 8 devices == 1 device, and the few-step sampler."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jdistill import config as config_lib
from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules
from jdistill.diffusion.timesteps import unit_grid
from jdistill.models.dit import DiT
from jdistill.objectives import ladd as ladd_obj
from jdistill.objectives.denoising import logit_normal
from jdistill.recipes import common, ladd, stages, tasks
from jdistill.sampling import samplers
from jdistill.testing import assert_close
from jdistill.train import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16
# a tiny LADD setup: 2-block DiT teacher, heads on both blocks, G every 3rd step
TINY = ["--config.discriminator.blocks=(0, 1)", "--config.discriminator.width=16", "--config.ladd.g_every=3",
        f"--config.data.batch_size={BATCH}", "--config.train.steps=6", "--config.train.ema_decay=0.9",
        "--config.student.optim.warmup=0"]  # warmup's lr is 0 on the first update: the student would not move


def tiny_config(extra=()):
    return config_lib.load_config(os.path.join(REPO, "configs", "digits_ladd.py"), [*TINY, *extra])


def tiny_teacher(seed=0):
    """A random 2-block flow DiT, every weight perturbed so that its blocks are not the identity
    (adaLN-Zero starts them so) and its tokens depend on t, the class and z."""
    module = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=10)
    params = common.init_params(module, seed)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return Denoiser.for_module(module, schedules.RectifiedFlow(shift=3.0), "flow", params)


def batch_of(step, n=BATCH):
    rng = np.random.default_rng([step, 3])
    return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    task = tasks.from_teacher(tiny_teacher())
    obj = ladd.objective(cfg, task)
    params = ladd.init_discriminator(obj.discriminator, task, 0)
    return cfg, task, obj, params


# -- the losses and draws ----------------------------------------------------------------


def test_losses_equal_their_closed_forms():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(0, 2, (8, 16)).astype(np.float32), rng.normal(0, 2, (8, 16)).astype(np.float32)
    hinge_d = np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake))
    ns_d = np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake)))
    np.testing.assert_allclose(ladd_obj.discriminator_loss(real, fake, "hinge"), hinge_d, rtol=1e-6)
    np.testing.assert_allclose(ladd_obj.discriminator_loss(real, fake, "non_saturating"), ns_d, rtol=1e-6)
    np.testing.assert_allclose(ladd_obj.generator_loss(fake, "hinge"), -np.mean(fake), rtol=1e-6)
    np.testing.assert_allclose(ladd_obj.generator_loss(fake, "non_saturating"), np.mean(np.log1p(np.exp(-fake))),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="unknown adversarial loss 'wasserstein'"):
        ladd_obj.generator_loss(fake, "wasserstein")


def test_logit_normal_draws_match_their_mean_and_std():
    n, m, s = 200_000, 1.0, 1.0
    t = np.asarray(logit_normal(jax.random.key(0), n, m, s), np.float64)
    logit = special.logit(t)
    # the logits are N(m, s): their mean within 4 standard errors, their std within 1%
    assert abs(logit.mean() - m) < 4 * s / np.sqrt(n)
    assert abs(logit.std() - s) < 0.01
    # E[t] = E[sigmoid(m + s Z)] by Gauss-Hermite quadrature
    x, w = np.polynomial.hermite_e.hermegauss(80)
    mean = np.sum(w * special.expit(m + s * x)) / np.sqrt(2 * np.pi)
    second = np.sum(w * special.expit(m + s * x) ** 2) / np.sqrt(2 * np.pi)
    assert abs(t.mean() - mean) < 4 * np.sqrt(second - mean**2) / np.sqrt(n)
    assert abs(t.std() - np.sqrt(second - mean**2)) < 0.005


def test_real_and_fake_are_renoised_independently_and_student_times_follow_their_probabilities(setup):
    _, _, obj, _ = setup
    x = jnp.zeros((4000, 2, 2, 1))
    k_real, k_fake = jax.random.split(jax.random.key(1))
    _, t_real = obj.renoise(x, k_real)
    _, t_fake = obj.renoise(x, k_fake)
    assert abs(np.corrcoef(t_real, t_fake)[0, 1]) < 0.05
    times = np.asarray(ladd_obj.student_times(jax.random.key(2), 40_000, obj.times, obj.time_probs))
    listed = np.asarray(obj.times, np.float32)  # the draws are float32 (the config's shift 3 makes 0.9)
    freq = np.array([np.mean(times == t) for t in listed])
    np.testing.assert_allclose(freq, obj.time_probs, atol=0.01)
    assert np.isin(times, listed).all()


# -- where the gradients go -----------------------------------------------------------------


def test_generator_gradient_reaches_x_hat_through_the_frozen_teacher(setup):
    _, task, obj, d_params = setup
    teacher_params, student_params = task.teacher.params, task.teacher.params
    batch = {k: jnp.asarray(v) for k, v in batch_of(0).items()}
    rng = jax.random.key(5)
    k_fake, k_renoise, _ = jax.random.split(rng, 3)
    cond = obj.cond_fn(batch)
    x_hat, _ = obj.fake(student_params, batch["image"], cond, k_fake)

    def adversarial(x):  # the generator's loss as a function of x_hat alone
        z, t = obj.renoise(x, k_renoise)
        return ladd_obj.generator_loss(obj.logits(d_params, teacher_params, z, t, cond), obj.loss)

    grad_x = jax.grad(adversarial)(x_hat)
    assert float(jnp.abs(grad_x).max()) > 0
    # the directional derivative along the gradient (its largest), so that float32 central
    # differences resolve it: a random direction's is ~sqrt(size) times smaller, lost in rounding
    v = grad_x / jnp.linalg.norm(grad_x)
    h = 1e-2
    numeric = (adversarial(x_hat + h * v) - adversarial(x_hat - h * v)) / (2 * h)
    np.testing.assert_allclose(numeric, jnp.vdot(grad_x, v), rtol=2e-2)
    # the student's gradient is that x_hat gradient pulled back through the student's step
    _, pull = jax.vjp(lambda p: obj.fake(p, batch["image"], cond, k_fake)[0], student_params)
    want = pull(grad_x)[0]
    got = jax.grad(lambda p: obj.g_loss(p, (d_params, teacher_params), batch, rng)[0])(student_params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, b, 1e-5)
    # the teacher's params never change: the engine test checks them bit for bit after training


def test_d_loss_gets_no_generator_gradient_and_g_loss_no_discriminator_gradient(setup):
    _, task, obj, d_params = setup
    tp = task.teacher.params
    batch = {k: jnp.asarray(v) for k, v in batch_of(1).items()}
    rng = jax.random.key(7)
    to_student = jax.grad(lambda sp: obj.d_loss(d_params, (sp, tp), batch, rng)[0])(tp)
    to_heads = jax.grad(lambda dp: obj.g_loss(tp, (dp, tp), batch, rng)[0])(d_params)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(to_student))
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(to_heads))
    # while each loss does move its own part
    own = jax.grad(lambda dp: obj.d_loss(dp, (tp, tp), batch, rng)[0])(d_params)
    assert any(np.asarray(g).any() for g in jax.tree.leaves(own))


def test_d_loss_reads_real_as_the_data_and_fake_as_the_students_each_renoised_with_its_own_key(setup):
    # rebuilt by hand from the pieces, in d_loss's key order (fake draw, real re-noise, fake re-noise, R1):
    # a swapped real / fake split or one key for both re-noisings reads other logits and another loss
    _, task, obj, d_params = setup
    tp = task.teacher.params
    batch = {k: jnp.asarray(v) for k, v in batch_of(2).items()}
    rng = jax.random.key(11)
    cond = obj.cond_fn(batch)
    k_fake, k_real, k_renoise_fake, _ = jax.random.split(rng, 4)
    x_hat = obj.fake(tp, batch["image"], cond, k_fake)[0]
    z_real, t_real = obj.renoise(batch["image"], k_real)
    z_fake, t_fake = obj.renoise(x_hat, k_renoise_fake)
    assert not np.array_equal(np.asarray(t_real), np.asarray(t_fake))
    real = np.asarray(obj.logits(d_params, tp, z_real, t_real, cond))
    fake = np.asarray(obj.logits(d_params, tp, z_fake, t_fake, cond))
    assert abs(real.mean() - fake.mean()) > 1e-3  # the two differ, so a swap shows
    loss, metrics = obj.d_loss(d_params, (tp, tp), batch, rng)
    np.testing.assert_allclose(metrics["real_logit"], real.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["fake_logit"], fake.mean(), rtol=1e-5, atol=1e-6)
    hinge = np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake))
    np.testing.assert_allclose(loss, hinge, rtol=1e-5)


def test_each_parts_lr_schedule_spans_the_updates_it_gets(setup):
    # 10 steps, the student every 3rd: updates at steps 0, 3, 6, 9, four of them; a linear decay to 0
    # over steps // 3 = 3 would give the fourth lr 0
    _, task, _, _ = setup
    cfg = tiny_config(["--config.student.optim.decay=linear",
                       "--config.discriminator.optim.decay=linear",
                       "--config.ladd.d_every=2"])
    engine = ladd.engine(cfg, task, 10)
    g, d = engine.parts[ladd.PART].lr_schedule, engine.parts[ladd.DISC].lr_schedule
    lr_g, lr_d = float(cfg.student.optim.lr), float(cfg.discriminator.optim.lr)
    np.testing.assert_allclose([float(g(k)) for k in range(4)], [lr_g * (1 - k / 4) for k in range(4)], rtol=1e-6)
    np.testing.assert_allclose([float(d(k)) for k in range(5)], [lr_d * (1 - k / 5) for k in range(5)], rtol=1e-6)


def _train(cfg, task, mesh, steps):
    """``steps`` LADD steps as the stage runner takes them (its init, shardings and jitted step)."""
    stage = ladd.stage(cfg, task)
    s = stages.setup(stage, None, cfg.train, mesh)
    state, history = s.state, []
    for k in range(steps):
        before = jax.device_get(state.parts)
        state, metrics = s.step_fn(state, stage.frozen, mesh_lib.global_batch(batch_of(k), mesh))
        history.append((before, jax.device_get(metrics)))
    return state, stage.frozen, history


def test_engine_step_ratio_separation_and_no_teacher_part(setup):
    cfg, task, _, _ = setup
    teacher_before = jax.device_get(task.teacher.params)
    mesh = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    state, _, history = _train(cfg, task, mesh, 6)
    # D every step, G on steps 0 and 3 (g_every=3), counted
    assert int(state.count("discriminator")) == 6 and int(state.count("student")) == 2
    assert [float(m["student/updated"]) for _, m in history] == [1, 0, 0, 1, 0, 0]
    after = jax.device_get(state.parts)
    for k, (before, metrics) in enumerate(history):
        nxt = history[k + 1][0] if k + 1 < len(history) else after
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["student"].params),
                                                       jax.tree.leaves(nxt["student"].params))]
        assert all(same) == (k % 3 != 0), f"step {k}: the student moved off its turn (or not on it)"
        assert np.isfinite(metrics["discriminator/loss"]) and np.isfinite(metrics["student/loss"])
    assert int(state.skipped) == 0
    # the teacher is no trainable part: the step has nothing through which to update it (its frozen
    # input is read-only, so comparing it before and after could not fail)
    assert set(after) == {"student", "discriminator"}
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["student"].params),
                                                        jax.tree.leaves(teacher_before)))


@pytest.mark.slow  # two meshes compiled: minutes on 2 cores
def test_8_devices_equal_1_device(setup):
    cfg, task, _, _ = setup
    out = {}
    for name, mesh in (("1", mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])), ("8", mesh_lib.make_mesh(4, 2))):
        state, _, _ = _train(cfg, task, mesh, 4)
        out[name] = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(out["8"]), jax.tree.leaves(out["1"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- sampling ----------------------------------------------------------------------------------


def test_renoise_sampler_is_x_hat_then_fresh_noise_to_the_next_time(setup):
    _, task, _, _ = setup
    den = task.teacher
    noise = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    cond = {"class_labels": jnp.arange(4)}
    rng = jax.random.key(4)
    got = samplers.sample(den, noise, cond, grid=unit_grid(den.schedule, 4), solver="renoise", rng=rng)
    z = noise
    for i, (t, t_next) in enumerate(zip([1.0, 0.75, 0.5, 0.25], [0.75, 0.5, 0.25, 0.0])):
        x_hat = z - t * den.output(z, t, cond)  # flow: x = z - t u
        z = x_hat if i == 3 else (1 - t_next) * x_hat + t_next * jax.random.normal(jax.random.fold_in(rng, i), z.shape)
    assert_close(got, z, 1e-5, "LADD's 4-step sampler")


def test_time_shift_moves_the_training_times_and_the_sampling_grid_alike(setup):
    _, task, obj, _ = setup
    listed = ladd.objective(tiny_config(["--config.ladd.time_shift=1.0"]), task)
    assert listed.times == (1.0, 0.75, 0.5, 0.25)  # shift 1: as listed
    assert np.asarray(unit_grid(task.teacher.schedule, 4, 1.0).t).tolist() == [1.0, 0.75, 0.5, 0.25]
    shifted = obj  # configs/digits_ladd.py: the teacher's own shift 3
    # SD3's shift 3 t / (1 + 2 t): FastGen's 4-step list is this rule at S = 5
    np.testing.assert_allclose(shifted.times, [1.0, 0.9, 0.75, 0.5], rtol=1e-7)
    grid = unit_grid(task.teacher.schedule, 4, 3.0)
    np.testing.assert_allclose(np.asarray(grid.t), shifted.times, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grid.t_next), [0.9, 0.75, 0.5, 0.0], rtol=1e-6)
    fastgen = unit_grid(task.teacher.schedule, 4, 5.0)
    np.testing.assert_allclose(np.asarray(fastgen.t), [1.0, 0.9375, 0.8333333, 0.625], rtol=1e-6)
    with pytest.raises(Exception, match="time_shift must be positive"):
        ladd.objective(tiny_config(["--config.ladd.time_shift=0.0"]), task)


def test_model_section_sets_execution_options_on_a_pretrained_network_and_refuses_the_rest():
    """LADD of a pipeline (configs/sd3_ladd.py) builds its network from the pipeline: the config's
    ``model`` section sets remat and dtype on it and is checked against it elsewhere (num_layers
    sizes a plan, a mismatch would otherwise fail in the first forward pass)."""
    from jdistill.errors import InvalidArgument
    from jdistill.models.mmdit import SD3Transformer2DModel

    den = Denoiser(params=None, schedule=schedules.RectifiedFlow(), module=SD3Transformer2DModel(num_layers=2),
                   prediction="flow")
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "sd3_ladd.py"), [
        "--config.model.num_layers=2", "--config.model.remat=full"])
    out = tasks.with_model_fields(den, cfg, "the pipeline")
    assert out.module.remat == "full" and out.module.num_layers == 2 and out.module.dtype == jnp.float32
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "sd3_ladd.py"))
    with pytest.raises(InvalidArgument, match=r"model.num_layers=24 but the pipeline has 2\. .*only remat, dtype"):
        tasks.with_model_fields(den, cfg, "the pipeline")
    # SD3.5 Large's depth, not SD3 Medium's, in its own config
    large = config_lib.load_config(os.path.join(REPO, "configs", "sd35_large_ladd.py"))
    assert large.model.num_layers == 38
