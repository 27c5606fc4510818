"""`jdistill distill` killed (SIGKILL) in the middle of a halving round and run again resumes that
round exactly: every stage's student ends bit-identical to an uninterrupted run."""

import json
import os

import jax
import numpy as np
from cli_helpers import REPO, run_cli, sigkill_at_checkpoint

from jdistill import config as config_lib
from jdistill.recipes import guided, teacher


def test_distill_killed_mid_round_resumes_bit_identical(tmp_path):
    tcfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_teacher.py"), [
        "--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.data.batch_size=16", "--config.train.steps=2", "--config.train.sample_every=0",
        "--config.optim.warmup=1"])
    teacher_dir = str(tmp_path / "teacher")
    teacher.train(tcfg, teacher_dir, progress=False)

    # stage 1, then students of 4, 2 and 1 steps; the 2-step round is the one interrupted
    args = ["distill", "--config", os.path.join(REPO, "configs", "digits_guided.py"), "--quiet",
            f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=", "--config.data.batch_size=16",
            "--config.stage1.steps=4", "--config.progressive.start_steps=4",
            "--config.progressive.train_steps.default=4", "--config.progressive.train_steps.2=16",
            "--config.progressive.train_steps.1=4", "--config.train.ckpt_every=4", "--config.train.keep=10",
            "--config.train.log_every=2"]
    full = run_cli([*args, "--workdir", str(tmp_path / "full")], devices=1)
    killed_dir = tmp_path / "killed"
    victim = run_cli([*args, "--workdir", str(killed_dir)], devices=1)
    done = sigkill_at_checkpoint(victim, killed_dir / "steps_002" / "checkpoints", 4)
    assert done[-1] < 16, f"the round finished before it was killed: {done}"
    assert not (killed_dir / "steps_001").exists()

    resumed = run_cli([*args, "--workdir", str(killed_dir)], devices=1)
    for p in (full, resumed):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    # the rerun went on from the round's last checkpoint and left the finished stages alone
    # (a killed session records no time; a restart from scratch would start at step 0)
    sessions = {name: json.loads((killed_dir / name / "timing.json").read_text())
                for name in ("stage1", "steps_004", "steps_002")}
    assert [(s["first_step"], s["last_step"]) for s in sessions["stage1"]] == [(0, 4)]
    assert [(s["first_step"], s["last_step"]) for s in sessions["steps_004"]] == [(0, 4)]
    assert [s["last_step"] for s in sessions["steps_002"]] == [16]
    assert sessions["steps_002"][0]["first_step"] in done and sessions["steps_002"][0]["first_step"] >= 4
    cfg = config_lib.load_config(args[2], args[4:])
    names = [name for name, _ in guided.stage_steps(cfg)]
    assert names == ["stage1", "steps_004", "steps_002", "steps_001"]
    for name in names:
        a, _ = guided.load_student(str(killed_dir), name)
        b, _ = guided.load_student(str(tmp_path / "full"), name)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
