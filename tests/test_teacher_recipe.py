"""The shipped teacher recipe end to end, at a tiny size: sharding, multi-process, exact resume
after SIGKILL, and clear errors for bad input. Runs the real CLI in subprocesses where a user would."""

import os
import socket

import jax
import numpy as np
import pytest
from cli_helpers import REPO, run_cli, sigkill_at_checkpoint

from jdistill import cli
from jdistill import config as config_lib
from jdistill.recipes import runs, teacher
from jdistill.train import mesh as mesh_lib
from jdistill.train.loop import read_metrics

CONFIG = os.path.join(REPO, "configs", "digits_teacher.py")
TINY = ["--config.model.hidden_size=64", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.data.batch_size=32", "--config.train.log_every=4", "--config.train.sample_every=0",
        "--config.optim.warmup=2"]


def tiny_cfg(*extra):
    return config_lib.load_config(CONFIG, TINY + list(extra))


def final_params(workdir, average=None):
    return jax.device_get(runs.read_params(str(workdir), part="model", average=average))


def assert_trees_equal(a, b, exact=True, rtol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def test_train_step_on_8_devices_equals_1_device():
    cfg = tiny_cfg("--config.train.steps=4")
    out = {}
    for name, mesh in (("1", mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])), ("8", mesh_lib.make_mesh(4, 2))):
        s, source = teacher.setup(cfg, None, mesh=mesh)
        state, losses = s.state, []
        for k, batch in enumerate(source.iterate(0, 2, mesh=mesh)):
            state, metrics = s.step_fn(state, None, batch)
            losses.append(float(metrics["loss"]))
        out[name] = (losses, jax.device_get(state.params("model")), state)
    np.testing.assert_allclose(out["8"][0], out["1"][0], rtol=1e-5)
    assert_trees_equal(out["8"][1], out["1"][1], exact=False)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(out["8"][2].params("model"))}
    assert any("fsdp" in s for s in specs), specs  # FSDP really split some params


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_loopback_equal_one_process(tmp_path):
    common_args = ["train", "--config", CONFIG, "--quiet", *TINY, "--config.train.steps=3",
                   "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.train.ckpt_every=3"]
    single = run_cli([*common_args, "--workdir", str(tmp_path / "one")], devices=8)
    port = _free_port()
    procs = [run_cli([*common_args, "--workdir", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                      "--num-processes", "2", "--process-id", str(i)], devices=4) for i in range(2)]
    for p in [single, *procs]:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    assert_trees_equal(final_params(tmp_path / "two"), final_params(tmp_path / "one"), exact=False)


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tmp_path):
    args = ["train", "--config", CONFIG, "--quiet", *TINY, "--config.train.steps=16", "--config.train.ckpt_every=4",
            "--config.train.keep=10"]
    full = run_cli([*args, "--workdir", str(tmp_path / "full")], devices=1)
    killed_dir = tmp_path / "killed"
    victim = run_cli([*args, "--workdir", str(killed_dir)], devices=1)
    done = sigkill_at_checkpoint(victim, killed_dir / "checkpoints", 4, timeout=240)
    assert done and done[-1] < 16, f"the run finished before it was killed: {done}"
    resumed = run_cli([*args, "--workdir", str(killed_dir)], devices=1)
    for p in (full, resumed):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    assert_trees_equal(final_params(killed_dir), final_params(tmp_path / "full"), exact=True)
    # the average the run samples with too, and one metrics row a logged step, the resumed run's
    assert_trees_equal(final_params(killed_dir, "ema"), final_params(tmp_path / "full", "ema"), exact=True)
    rows = {name: read_metrics(str(tmp_path / name / "metrics.jsonl")) for name in ("full", "killed")}
    assert [r["step"] for r in rows["killed"]] == [r["step"] for r in rows["full"]] == [4, 8, 12, 16]
    assert [r["loss"] for r in rows["killed"]] == [r["loss"] for r in rows["full"]]


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    def fails(argv, match):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert match in err, err

    base = ["train", "--config", CONFIG, "--quiet", "--workdir", str(tmp_path / "w")]
    fails([*base, "--config.train.stepz=3"], "unknown config key 'train.stepz'; did you mean train.steps")
    fails([*base, "--config.train.steps=many"], "expected int")
    fails([*base, "--config.model.in_channels=3"], "expects (8, 8, 3)")
    fails([*base, "--config.data.name=cifar10"], "cifar10")
    fails(["sample", "--workdir", str(tmp_path / "nothing")], "no checkpoint directory")
    fails(["eval", str(tmp_path / "missing.npz")], "no samples file")
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    fails(["eval", str(tmp_path / "rgb.npz")], "defined for 8x8x1 digits")


def test_resume_with_another_model_is_refused(tmp_path):
    cfg = tiny_cfg("--config.train.steps=2", "--config.train.ckpt_every=2")
    teacher.train(cfg, str(tmp_path), progress=False)
    other = tiny_cfg("--config.train.steps=4", "--config.model.hidden_size=32")
    with pytest.raises(config_lib.ConfigError, match="model.hidden_size: checkpoint 64 vs config 32"):
        teacher.setup(other, str(tmp_path))
