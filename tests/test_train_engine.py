"""The training engine on its own: sharded step == single-device step, logical-axis layout,
Orbax save/restore into shardings, averages read as they are now, sub-updates at their own
rates, the non-finite guard, trainable masks, and clear errors for bad checkpoints."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.objectives.denoising import denoising_loss
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import engine as engine_lib
from jdistill.train import mesh as mesh_lib
from jdistill.train import optim
from jdistill.train import partitioning


class TinyNet(nn.Module):
    """A small conditional conv net: enough structure for FSDP to split something."""

    @nn.compact
    def __call__(self, x, t, class_labels):
        h = nn.Conv(64, (3, 3))(x)
        h = h + nn.Dense(64)(jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 17)))[:, None, None]
        h = h + nn.Embed(11, 64)(class_labels)[:, None, None]
        h = nn.Conv(256, (3, 3))(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def make_setup(mesh):
    module = TinyNet()
    template = Denoiser(params=None, schedule=schedules.CosineVP(), module=module, prediction="v",
                        null_cond=NullClass(10))
    loss_fn = denoising_loss(template, weighting="truncated_snr", cond_drop_prob=0.2)
    tx, sched = optim.make_optimizer(1e-3, 100, warmup=2)
    engine = engine_lib.single(loss_fn, tx, sched, ema_decay=0.9)

    def init():
        params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
        return engine.init({"student": params["params"]}, jax.random.key(1))

    sh = engine.shardings(jax.eval_shape(init), mesh, min_size=1024)
    state = jax.jit(init, out_shardings=sh)()
    return state, engine.jit(mesh, state, min_size=1024), engine


def batch_for(mesh, seed=0, n=16):
    rng = np.random.default_rng(seed)
    local = {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}
    return mesh_lib.global_batch(local, mesh)


def test_sharded_step_equals_single_device():
    results = {}
    for name, mesh in {"1 device": mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]),
                       "8 devices (data 4, fsdp 2)": mesh_lib.make_mesh(4, 2)}.items():
        state, step, engine = make_setup(mesh)
        losses = []
        for i in range(3):
            state, metrics = step(state, None, batch_for(mesh, i))
            losses.append(float(metrics["loss"]))
        results[name] = (np.array(losses), jax.device_get(state.params()), jax.device_get(state.averages["ema"]), state)
    (l1, p1, e1, _), (l8, p8, e8, s8) = results.values()
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8) + jax.tree.leaves(e8), jax.tree.leaves(p1) + jax.tree.leaves(e1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # FSDP really split the big conv kernel (output channels) and its Adam moments alike
    big = s8.params()["Conv_1"]["kernel"]
    assert big.sharding.spec == P(None, None, None, "fsdp"), big.sharding.spec
    mu = s8.parts["student"].opt_state[1][0].mu["Conv_1"]["kernel"]
    assert mu.sharding.spec == big.sharding.spec
    assert s8.averages["ema"]["Conv_1"]["kernel"].sharding.spec == big.sharding.spec


def test_logical_axis_rules():
    mesh = mesh_lib.make_mesh(2, 2, 2)
    tree = {"attn": {"to_q": {"kernel": jax.ShapeDtypeStruct((128, 256), jnp.float32)},
                     "to_out_0": {"kernel": jax.ShapeDtypeStruct((256, 128), jnp.float32)}},
            "ff": {"net_2": {"kernel": jax.ShapeDtypeStruct((512, 128), jnp.float32)}},
            "emb": {"embedding": jax.ShapeDtypeStruct((1001, 128), jnp.float32)},
            "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32)},
            "bias": jax.ShapeDtypeStruct((4096,), jnp.float32)}
    specs = partitioning.partition_specs(tree, mesh, min_size=1)
    assert specs["attn"]["to_q"]["kernel"] == P("fsdp", "tensor")  # embed -> fsdp, heads -> tensor
    assert specs["attn"]["to_out_0"]["kernel"] == P("tensor", "fsdp")
    assert specs["ff"]["net_2"]["kernel"] == P("tensor", "fsdp")  # mlp -> tensor
    assert specs["emb"]["embedding"] == P(None, "fsdp")  # 1001 rows: tensor does not divide them
    assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["bias"] == P("fsdp")  # unnamed: the largest dimension fsdp divides
    # rules from a config: heads to fsdp too, nothing on tensor
    rules = (("embed", None), ("heads", ("fsdp", "tensor")))
    assert partitioning.partition_specs(tree, mesh, rules, min_size=1)["attn"]["to_q"]["kernel"] == P(None, ("fsdp", "tensor"))
    assert partitioning.partition_specs(tree, mesh, min_size=10**6)["attn"]["to_q"]["kernel"] == P()
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_lib.make_mesh(3, 2)


def test_activations_are_laid_out_by_the_batch_rule_inside_a_sharded_step_only():
    mesh = mesh_lib.make_mesh(2, 4)  # data 2, fsdp 4
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    assert partitioning.constrain_batch(x) is x  # outside a sharded step: nothing to constrain

    def laid_out(x):
        with partitioning.activation_layout(mesh):
            return partitioning.constrain_batch(x * 2)

    assert jax.jit(laid_out)(x).sharding.spec == P(("data", "fsdp"))  # the batch over data x fsdp
    assert jax.jit(laid_out)(x[:6]).sharding.spec == P("data")  # 6 rows: fsdp does not divide them
    np.testing.assert_array_equal(jax.jit(laid_out)(x), 2 * x)
    # the engine's jitted step traces its loss (so every network block) under the layout
    def loss(params, frozen, batch, rng):
        return jnp.mean(partitioning.constrain_batch(params["w"] * batch["image"])), {}

    engine = engine_lib.single(loss, optax.sgd(0.1))
    state = engine.init({"student": {"w": jnp.ones((8, 8, 1))}}, jax.random.key(0))
    batch = {"image": jnp.ones((8, 8, 8, 1))}
    assert "sharding_constraint" in engine.jit(mesh, state).lower(state, None, batch).as_text()
    assert "sharding_constraint" not in jax.jit(engine.step).lower(state, None, batch).as_text()


def test_checkpoint_roundtrip_into_shardings_and_errors(tmp_path):
    mesh = mesh_lib.make_mesh(4, 2)
    state, step, engine = make_setup(mesh)
    state, _ = step(state, None, batch_for(mesh))
    sh = engine.shardings(state, mesh, min_size=1024)
    with ckpt_lib.Checkpointer(tmp_path / "ckpt", save_every=1) as ck:
        assert ck.save(1, state, config={"model": {"width": 64}}, meta={"round": 2})
    expected = jax.device_get(state)

    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
    restored, config, meta = ck.restore(partitioning.abstract_like(state, sh))
    assert config == {"model": {"width": 64}} and meta == {"round": 2}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = restored.params()["Conv_1"]["kernel"]
    assert kernel.sharding.spec == state.params()["Conv_1"]["kernel"].sharding.spec
    # reading only what sampling needs: the EMA, from the checkpoint's own metadata
    ema = ckpt_lib.Checkpointer(tmp_path / "ckpt", read_only=True).read_params("student", "ema")
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(expected.averages["ema"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint for step 7"):
        ck.restore(partitioning.abstract_like(state, sh), step=7)
    with pytest.raises(ckpt_lib.CheckpointError, match="has no part 'generator'"):
        ckpt_lib.Checkpointer(tmp_path / "ckpt", read_only=True).read_params("generator")
    ck.close()

    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in"):
        ckpt_lib.Checkpointer(tmp_path / "empty").restore(partitioning.abstract_like(state, sh))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint directory"):
        ckpt_lib.Checkpointer(tmp_path / "nowhere", read_only=True)

    # damage the stored arrays: restoring must fail loudly, naming the checkpoint and the damaged file
    for root, _, files in os.walk(tmp_path / "ckpt" / "1" / "state"):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64:
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 2)
    with pytest.raises(ckpt_lib.CheckpointError, match="no intact checkpoint in .*ckpt: step 1: state/"):
        ckpt_lib.Checkpointer(tmp_path / "ckpt").restore(partitioning.abstract_like(state, sh))


# -- averages: read now, each at its own rate -----------------------------------------------


def _quadratic_engine(inputs):
    """params p pulled toward a target: loss = sum((p - sg(target))^2) + sum(p^2)."""
    def loss(p, target, batch, rng):
        return jnp.sum((p["w"] - jax.lax.stop_gradient(target["w"])) ** 2) + jnp.sum(p["w"] ** 2), {}

    return engine_lib.Engine({"student": engine_lib.Part(optax.sgd(0.1))},
                             [engine_lib.Update("student", loss, inputs)],
                             {"target": engine_lib.Average("student", 0.5), "ema": engine_lib.Average("student", 0.9)})


def _expected_quadratic(steps, w0):
    """The closed form: SGD on the loss with the target the running 0.5-average as it is at each step."""
    w, target, ema = w0, w0, w0
    history = []
    for _ in range(steps):
        grad = 2 * (w - target) + 2 * w
        w = w - 0.1 * grad
        target = 0.5 * target + 0.5 * w
        ema = 0.9 * ema + 0.1 * w
        history.append((w, target, ema))
    return history


def test_loss_reads_the_target_average_as_it_is_now():
    w0 = np.array([1.0, -2.0, 3.0], np.float32)
    expected = _expected_quadratic(6, w0)

    def run(inputs):
        engine = _quadratic_engine(inputs)
        state = engine.init({"student": {"w": jnp.asarray(w0)}}, jax.random.key(0))
        step = jax.jit(engine.step)
        out = []
        for _ in range(6):
            state, _ = step(state, None, {})
            out.append((np.asarray(state.params()["w"]), np.asarray(state.averages["target"]["w"]),
                        np.asarray(state.averages["ema"]["w"])))
        return out

    def matches(history):
        return all(np.allclose(got[i], want[i], rtol=1e-6) for got, want in zip(history, expected) for i in range(3))

    # the engine's way: the target read from the state inside the step
    assert matches(run(lambda state, frozen: state.averages["target"]))
    # the reference CoDi code's bug, the target captured when the step was traced: it fails
    captured = {}

    def at_trace_time(state, frozen):
        captured.setdefault("target", {"w": jnp.asarray(w0)})
        return captured["target"]

    assert not matches(run(at_trace_time))


def test_averages_decay_schedule_reads_the_update_count():
    def loss(p, frozen, batch, rng):
        return jnp.sum(p["w"]), {}

    decays = []
    engine = engine_lib.Engine({"student": engine_lib.Part(optax.sgd(1.0))}, [engine_lib.Update("student", loss)],
                               {"ema": engine_lib.Average("student", lambda count: 1.0 - 1.0 / (count + 1.0))})
    state = engine.init({"student": {"w": jnp.zeros(())}}, jax.random.key(0))
    for k in range(4):
        state, _ = jax.jit(engine.step)(state, None, {})
        decays.append(float(state.averages["ema"]["w"]))
    # decay 1 - 1/(k+1) is the running mean of w_1..w_k: w_k = -k, mean = -(k+1)/2
    np.testing.assert_allclose(decays, [-1.0, -1.5, -2.0, -2.5], rtol=1e-6)


# -- two parts: a 2-D GAN with D every step and G every second ------------------------------


def gan_engine(g_every=2):
    from toy_gan import engine as toy_engine

    return toy_engine(g_every)


def test_gan_sub_updates_ratio_and_separation():
    from toy_gan import d_loss, g_loss, init_params, sample_batch

    engine = gan_engine(2)
    state = engine.init(init_params(), jax.random.key(0))
    step = jax.jit(engine.step)
    for k in range(5):
        before = jax.device_get(state)
        batch = sample_batch(k)
        state, metrics = step(state, None, batch)
        key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), k)
        # the discriminator's update, by hand: its loss, the generator as it was, D's own optimizer
        d_params, d_opt = before.parts["discriminator"].params, before.parts["discriminator"].opt_state
        grads = jax.grad(lambda d: d_loss(d, before.parts["generator"].params, batch, key)[0])(d_params)
        updates, _ = engine.parts["discriminator"].optimizer.update(grads, d_opt, d_params)
        want_d = optax.apply_updates(d_params, updates)
        for a, b in zip(jax.tree.leaves(state.params("discriminator")), jax.tree.leaves(want_d)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # G's update never touches D
        if k % 2 == 0:  # G's update reads D as it is NOW, after D's update of this same step
            g_params, g_opt = before.parts["generator"].params, before.parts["generator"].opt_state
            grads = jax.grad(lambda g: g_loss(g, want_d, batch, jax.random.fold_in(key, 1))[0])(g_params)
            updates, _ = engine.parts["generator"].optimizer.update(grads, g_opt, g_params)
            want_g = optax.apply_updates(g_params, updates)
            assert float(metrics["generator/updated"]) == 1.0
        else:  # not G's turn: every generator param bit-identical
            want_g = before.parts["generator"].params
            assert float(metrics["generator/updated"]) == 0.0
        for a, b in zip(jax.tree.leaves(state.params("generator")), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(state.count("discriminator")) == 5 and int(state.count("generator")) == 3  # steps 0, 2, 4


def test_gan_8_devices_equal_1_device():
    from toy_gan import init_params, sample_batch

    out = {}
    for name, mesh in (("1", mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])), ("8", mesh_lib.make_mesh(4, 2))):
        engine = gan_engine(2)
        state = engine.init(init_params(), jax.random.key(0))
        state = jax.device_put(state, engine.shardings(state, mesh, min_size=1))
        step = engine.jit(mesh, state, min_size=1)
        for k in range(4):
            state, _ = step(state, None, mesh_lib.global_batch(jax.device_get(sample_batch(k)), mesh))
        out[name] = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(out["8"]), jax.tree.leaves(out["1"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gan_sigkill_then_resume_is_bit_identical(tmp_path):
    from cli_helpers import run_script, sigkill_at_checkpoint

    full = run_script("toy_gan.py", [str(tmp_path / "full"), "40"], devices=1)
    victim = run_script("toy_gan.py", [str(tmp_path / "killed"), "40"], devices=1)
    done = sigkill_at_checkpoint(victim, tmp_path / "killed" / "checkpoints", 10, timeout=240)
    assert done and done[-1] < 40, f"the run finished before it was killed: {done}"
    resumed = run_script("toy_gan.py", [str(tmp_path / "killed"), "40"], devices=1)
    for p in (full, resumed):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    a = ckpt_lib.Checkpointer(tmp_path / "full" / "checkpoints", read_only=True)
    b = ckpt_lib.Checkpointer(tmp_path / "killed" / "checkpoints", read_only=True)
    for part in ("generator", "discriminator"):
        for x, y in zip(jax.tree.leaves(a.read_params(part, None)), jax.tree.leaves(b.read_params(part, None))):
            np.testing.assert_array_equal(x, y)


# -- guards and masks ----------------------------------------------------------------------


def test_nonfinite_update_is_skipped_and_counted():
    def loss(p, frozen, batch, rng):  # finite except where the batch says "poison"
        return jnp.sum(p["w"] ** 2) * batch["scale"], {}

    engine = engine_lib.single(loss, optax.sgd(0.1), ema_decay=0.5)
    state = engine.init({"student": {"w": jnp.ones((3,))}}, jax.random.key(0))
    step = jax.jit(engine.step)
    state, m = step(state, None, {"scale": jnp.asarray(1.0)})
    good = jax.device_get(state)
    state, m = step(state, None, {"scale": jnp.asarray(jnp.inf)})
    assert int(m["nonfinite_skipped"]) == 1 and int(state.skipped) == 1
    np.testing.assert_array_equal(state.params()["w"], good.params()["w"])
    np.testing.assert_array_equal(state.averages["ema"]["w"], good.averages["ema"]["w"])
    assert int(state.count()) == 1 and int(state.step) == 2  # the step advanced, the update did not
    state, m = step(state, None, {"scale": jnp.asarray(1.0)})
    assert int(state.count()) == 2 and int(m["nonfinite_skipped"]) == 1


def test_divergent_update_is_refused_though_finite():
    """lr 1e6 under clipping moves every param by ~1e6: finite, and useless. The update is refused
    (over max_update_ratio times the part's norm), the optimizer state kept; a sane lr trains."""
    def loss(p, frozen, batch, rng):
        return jnp.sum((p["w"] - 3.0) ** 2), {}

    w0 = {"w": jnp.full((16,), 0.1)}
    for lr, ratio, applied in [(1e6, engine_lib.MAX_UPDATE_RATIO, False), (1e-2, engine_lib.MAX_UPDATE_RATIO, True),
                               (1e6, None, True), (30.0, None, True), (30.0, 100.0, False), (30.0, 200.0, True)]:
        # the first Adam step moves each param by lr: norm 4 lr against the floor 1 (|w0| = 0.4)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
        engine = engine_lib.single(loss, tx).with_max_update_ratio(ratio)
        state = engine.init({"student": w0}, jax.random.key(0))
        state, m = jax.jit(engine.step)(state, None, {})
        assert int(m["nonfinite_skipped"]) == (0 if applied else 1), (lr, ratio)
        moved = np.abs(np.asarray(state.params()["w"]) - 0.1).max()
        assert (moved > 0.5 * lr) if applied else (moved == 0 and int(state.count()) == 0), (lr, ratio, moved)


def test_trainable_mask_freezes_leaves_bit_for_bit_and_keeps_no_moments():
    def loss(p, frozen, batch, rng):
        return jnp.sum((p["backbone"]["w"] * p["adapter"]["w"] - 3.0) ** 2), {}

    mask = {"backbone": {"w": False}, "adapter": {"w": True}}
    engine = engine_lib.Engine({"student": engine_lib.Part(optax.adamw(1e-2, weight_decay=0.1), None, mask)},
                               [engine_lib.Update("student", loss)], {"ema": engine_lib.Average("student", 0.9)})
    backbone = jax.random.normal(jax.random.key(1), (4,))
    state = engine.init({"student": {"backbone": {"w": backbone}, "adapter": {"w": jnp.ones((4,))}}}, jax.random.key(0))
    assert state.parts["student"].opt_state[0].mu["backbone"]["w"] is None  # no moments for frozen leaves
    assert state.averages["ema"]["backbone"]["w"] is None
    for _ in range(5):
        state, _ = jax.jit(engine.step)(state, None, {})
    np.testing.assert_array_equal(state.params()["backbone"]["w"], backbone)
    assert np.abs(np.asarray(state.params()["adapter"]["w"]) - 1.0).max() > 1e-3
    full_ema = engine.average_params(state, "ema")
    np.testing.assert_array_equal(full_ema["backbone"]["w"], backbone)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Rows a killed session logged after its last checkpoint are dropped when the run resumes from
    that checkpoint: the resumed run logs those steps again."""
    from jdistill.train.loop import MetricWriter, read_metrics

    first = MetricWriter(str(tmp_path))
    for step in (4, 8, 12):
        first.write(step, {"loss": float(step)})
    resumed = MetricWriter(str(tmp_path), resume_from=8)  # the checkpoint at step 8
    resumed.write(12, {"loss": -12.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == \
        [(4, 4.0), (8, 8.0), (12, -12.0)]
    MetricWriter(str(tmp_path), resume_from=12)  # nothing after 12: the file stays as it is
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 3
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a kill mid-write leaves half a row
        f.write('{"step": 16, "lo')
    MetricWriter(str(tmp_path), resume_from=12)
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [4, 8, 12]
