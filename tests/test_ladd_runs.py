"""LADD end to end: synthetic data written once and resumed exactly, `jdistill distill` killed
(SIGKILL) and run again ends bit-identical, the results table, and the SD3 config trained for a
few steps on a tiny converted SD3 pipeline (feature shapes, finite losses)."""

import json
import os

import jax
import numpy as np
import pytest
from cli_helpers import REPO, run_cli, sigkill_at_checkpoint

from jdistill import config as config_lib
from jdistill.errors import InvalidArgument, MissingInput
from jdistill.recipes import ladd, ladd_table, runs, synth, teacher
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train.loop import read_metrics


def ladd_args(teacher_dir, synth_dir, extra=()):
    return [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=", f"--config.synth.dir={synth_dir}",
            "--config.synth.num=40", "--config.synth.shard_size=16", "--config.synth.batch_size=8",
            "--config.synth.steps=3", "--config.data.batch_size=8", "--config.discriminator.blocks=(0,)",
            "--config.discriminator.width=8", "--config.ladd.g_every=2", *extra]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 2-step tiny flow teacher and its synthetic data."""
    root = tmp_path_factory.mktemp("ladd")
    tcfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_flow_teacher.py"), [
        "--config.model.hidden_size=16", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.data.batch_size=16", "--config.train.steps=2", "--config.train.sample_every=0",
        "--config.optim.warmup=1"])
    teacher.train(tcfg, str(root / "teacher"), progress=False)
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_ladd.py"),
                                 ladd_args(root / "teacher", root / "synth"))
    synth.generate(cfg, progress=False)
    return root, cfg


def test_synthetic_data_resume_exactly_and_refuse_other_settings(made):
    root, cfg = made
    directory = synth.synth_dir(cfg)
    m = synth.manifest(cfg)
    assert synth.num_shards(m) == 3 and m["condition"] == "label"
    images, labels = synth.load(directory, m)
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.float32 and np.isfinite(images).all()
    np.testing.assert_array_equal(labels, np.arange(40) % 10)  # balanced classes
    # a run killed mid-shard leaves a temporary file and a missing shard: the rerun writes the same bytes
    before = {k: np.load(synth.shard_path(directory, k))["image"] for k in range(3)}
    os.remove(synth.shard_path(directory, 1))
    with open(synth.shard_path(directory, 1) + ".tmp.npz", "wb") as f:
        f.write(b"half a shard")
    with pytest.raises(MissingInput, match="1 of 3 shards missing"):
        synth.load(directory, m)
    synth.generate(cfg, progress=False)
    for k in range(3):
        np.testing.assert_array_equal(np.load(synth.shard_path(directory, k))["image"], before[k])
    other = config_lib.apply_overrides(cfg, ["--config.synth.guidance_scale=3.0"])
    with pytest.raises(InvalidArgument, match="guidance_scale: 1.5 there vs 3.0"):
        synth.generate(other, progress=False)
    # the training source reads them, labels and all
    batch = synth.task(cfg).source[0]
    assert batch["image"].shape == (8, 8, 8, 1) and batch["label"].dtype == np.int32


def test_distill_killed_then_resumed_is_bit_identical_and_the_table_reads_it(made, tmp_path):
    root, cfg = made
    args = ["distill", "--config", os.path.join(REPO, "configs", "digits_ladd.py"), "--quiet",
            *ladd_args(root / "teacher", root / "synth", ["--config.train.steps=12", "--config.train.ckpt_every=4",
                                                          "--config.train.keep=10", "--config.train.log_every=2"])]
    full = run_cli([*args, "--workdir", str(tmp_path / "full")], devices=1)
    victim = run_cli([*args, "--workdir", str(tmp_path / "killed")], devices=1)
    done = sigkill_at_checkpoint(victim, tmp_path / "killed" / "checkpoints", 4)
    assert done[-1] < 12, f"the run finished before it was killed: {done}"
    resumed = run_cli([*args, "--workdir", str(tmp_path / "killed")], devices=1)
    for p in (full, resumed):
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    sessions = json.loads((tmp_path / "killed" / "timing.json").read_text())
    assert sessions[0]["first_step"] in done and sessions[0]["first_step"] >= 4
    a = ckpt_lib.Checkpointer(tmp_path / "full" / "checkpoints", read_only=True)
    b = ckpt_lib.Checkpointer(tmp_path / "killed" / "checkpoints", read_only=True)
    for part, average in (("student", None), ("student", "ema"), ("discriminator", None)):
        for x, y in zip(jax.tree.leaves(a.read_params(part, average)), jax.tree.leaves(b.read_params(part, average)),
                        strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{part} {average}")
    metrics = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    assert all(np.isfinite(r["discriminator/loss"]) and np.isfinite(r["student/loss"]) for r in metrics)
    assert metrics[-1]["nonfinite_skipped"] == 0

    # the results table over two "seeds" (the same run twice) and the teacher
    out = tmp_path / "table"
    result = ladd_table.results_table([str(tmp_path / "full"), str(tmp_path / "killed")], num=40,
                                      out_dir=str(out), teacher_steps=(2, 64), student_steps=(1, 4), progress=False)
    assert [(r["model"], r["steps"]) for r in result["rows"]][:2] == [("teacher", 2), ("teacher", 64)]
    assert len([r for r in result["rows"] if r.get("method") == "ladd"]) == 4
    spread = {s["steps"]: s for s in result["seeds"]}
    assert spread[4]["worst_over_best"] == pytest.approx(1.0)  # the two runs are bit-identical
    assert [c["target"] for c in result["checks"]] == ["<= 1.10", "<= 1.50", ">= 25", "<= 1.20"]
    assert {"results.json", "results.md", "teacher_64steps.png"} <= set(os.listdir(out))
    with pytest.raises(InvalidArgument, match="takes LADD runs"):
        ladd_table.results_table([str(root / "teacher")], num=10, progress=False)
    # a LADD student samples unguided
    with pytest.raises(InvalidArgument, match="unguided"):
        ladd.make_sampler(runs.open_run(str(tmp_path / "full")), guidance_scale=2.0)
