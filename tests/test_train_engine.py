"""The training engine on its own: sharded step == single-device step, FSDP layout,
Orbax save/restore into shardings, clear errors for missing or damaged checkpoints."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.objectives.denoising import denoising_loss
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import mesh as mesh_lib
from jdistill.train import state as state_lib
from jdistill.train import step as step_lib


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
    tx, sched = state_lib.make_optimizer(1e-3, 100, warmup=2)

    def init():
        params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
        return state_lib.init_state(params["params"], tx, jax.random.key(1))

    state, _ = step_lib.sharded_init(init, mesh, min_size=1024)
    step = step_lib.make_train_step(loss_fn, tx, mesh=mesh, state=state, ema_decay=0.9, lr_schedule=sched,
                                    min_size=1024)
    return state, step


def batch_for(mesh, seed=0, n=16):
    rng = np.random.default_rng(seed)
    local = {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, n).astype(np.int32)}
    return mesh_lib.global_batch(local, mesh)


def test_sharded_step_equals_single_device():
    results = {}
    for name, mesh in {"1 device": mesh_lib.make_mesh(1, 1, jax.devices()[:1]),
                       "8 devices (data 4, fsdp 2)": mesh_lib.make_mesh(4, 2)}.items():
        state, step = make_setup(mesh)
        losses = []
        for i in range(3):
            state, metrics = step(state, None, batch_for(mesh, i))
            losses.append(float(metrics["loss"]))
        results[name] = (np.array(losses), jax.device_get(state.params), jax.device_get(state.ema_params), state)
    (l1, p1, e1, _), (l8, p8, e8, s8) = results.values()
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8) + jax.tree.leaves(e8), jax.tree.leaves(p1) + jax.tree.leaves(e1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # FSDP really split the big kernel (and its Adam moments) over the fsdp axis
    big = s8.params["Conv_1"]["kernel"]
    assert "fsdp" in tuple(big.sharding.spec), big.sharding.spec
    mu = s8.opt_state[1][0].mu["Conv_1"]["kernel"]
    assert mu.sharding.spec == big.sharding.spec


def test_partition_rules_override_default():
    mesh = mesh_lib.make_mesh(4, 2)
    tree = {"a": {"kernel": jax.ShapeDtypeStruct((64, 512), jnp.float32)}, "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    specs = mesh_lib.partition_specs(tree, mesh, rules=[(r"a/kernel", P("fsdp", None))], min_size=1)
    assert specs["a"]["kernel"] == P("fsdp", None)
    assert mesh_lib.partition_specs(tree, mesh, min_size=1)["a"]["kernel"] == P(None, "fsdp")
    assert mesh_lib.partition_specs(tree, mesh, min_size=10**6)["a"]["kernel"] == P()
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_lib.make_mesh(3, 2)


def test_checkpoint_roundtrip_into_shardings_and_errors(tmp_path):
    mesh = mesh_lib.make_mesh(4, 2)
    state, step = make_setup(mesh)
    state, _ = step(state, None, batch_for(mesh))
    sh = step_lib.state_shardings(state, mesh, min_size=1024)
    with ckpt_lib.Checkpointer(tmp_path / "ckpt", save_every=1) as ck:
        assert ck.save(1, state, config={"model": {"width": 64}}, meta={"round": 2})
    expected = jax.device_get(state)

    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
    restored, config, meta = ck.restore(ckpt_lib.abstract_like(state, sh))
    assert config == {"model": {"width": 64}} and meta == {"round": 2}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["Conv_1"]["kernel"].sharding.spec == state.params["Conv_1"]["kernel"].sharding.spec
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint for step 7"):
        ck.restore(ckpt_lib.abstract_like(state, sh), step=7)
    ck.close()

    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in"):
        ckpt_lib.Checkpointer(tmp_path / "empty").restore(ckpt_lib.abstract_like(state, sh))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint directory"):
        ckpt_lib.Checkpointer(tmp_path / "nowhere", read_only=True)

    # damage the stored arrays: restoring must fail loudly, naming the checkpoint
    for root, _, files in os.walk(tmp_path / "ckpt" / "1" / "state"):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64:
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 2)
    with pytest.raises(ckpt_lib.CheckpointError, match="step 1 .* cannot be restored"):
        ckpt_lib.Checkpointer(tmp_path / "ckpt").restore(ckpt_lib.abstract_like(state, sh))
