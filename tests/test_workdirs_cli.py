"""Every kind of workdir the project writes can be sampled and evaluated through the command line:
a teacher, a guided distillation (picking its stage by step count), and each of its stages;
loading never trains (a missing teacher is named, not retrained)."""

import os
import shutil

import numpy as np
import pytest
from cli_helpers import REPO

from jdistill import cli

TEACHER = os.path.join(REPO, "configs", "digits_teacher.py")
GUIDED = os.path.join(REPO, "configs", "digits_guided.py")
TINY_TEACHER = ["--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
                "--config.data.batch_size=16", "--config.train.steps=3", "--config.train.sample_every=0",
                "--config.optim.warmup=1", "--config.train.ckpt_every=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("workdirs")
    teacher, guided = str(root / "teacher"), str(root / "guided")
    assert cli.main(["train", "--config", TEACHER, "--workdir", teacher, "--quiet", *TINY_TEACHER]) == 0
    assert cli.main(["distill", "--config", GUIDED, "--workdir", guided, "--quiet",
                     f"--config.teacher.workdir={teacher}", "--config.teacher.config=", "--config.data.batch_size=16",
                     "--config.stage1.steps=2", "--config.progressive.start_steps=2",
                     "--config.progressive.train_steps.default=2", "--config.progressive.train_steps.2=2",
                     "--config.progressive.train_steps.1=2", "--config.train.ckpt_every=2"]) == 0
    return root, teacher, guided


CASES = [
    ("teacher", "teacher", ["--steps", "4"], "teacher ddim 4 steps"),
    ("guided root, 2 steps", "guided", ["--steps", "2"], "student (steps_002) ddim 2 steps"),
    ("guided root, 1 step", "guided", ["--steps", "1"], "student (steps_001) ddim 1 steps"),
    ("guided root, 3 steps: stage 1", "guided", ["--steps", "3"], "student (stage1) ddim 3 steps"),
    ("stage 1", "guided/stage1", ["--steps", "5"], "student (stage1) ddim 5 steps"),
    ("stage steps_002", "guided/steps_002", [], "student (steps_002) ddim 2 steps"),
    ("stage steps_001, stochastic", "guided/steps_001", ["--stochastic"], "student (steps_001) stochastic 1 steps"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sample_and_eval_every_workdir(trained, case, tmp_path, capsys):
    root, _, _ = trained
    _, rel, args, description = case
    workdir = str(root / rel)
    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--workdir", workdir, "--num", "80", "--out", str(out), *args]) == 0
    assert description in capsys.readouterr().out
    with np.load(out) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (80, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(80) % 10)
    # scoring the run directly samples the same images (same seed) and gives the file's FD
    assert cli.main(["eval", str(out)]) == 0
    from_file = capsys.readouterr().out
    assert cli.main(["eval", workdir, "--num", "80", *args]) == 0
    from_run = capsys.readouterr().out
    fd = [line for line in from_file.splitlines() if line.startswith("fd:")]
    assert fd and fd[0] in from_run.splitlines(), (from_file, from_run)


def test_too_few_samples_for_fd_is_named(trained, capsys):
    _, teacher, _ = trained
    assert cli.main(["eval", teacher, "--num", "20", "--steps", "2"]) == 2
    assert "20 samples of 64-d features: need at least 65" in capsys.readouterr().err


def test_a_stage_trained_for_other_steps_is_refused(trained, capsys):
    root, _, _ = trained
    assert cli.main(["sample", "--workdir", str(root / "guided" / "steps_002"), "--steps", "4"]) == 2
    assert "distilled for 2 steps" in capsys.readouterr().err


def test_a_spacing_or_timestep_list_is_refused_where_no_consistency_sampler_reads_it(trained, capsys):
    root, teacher, _ = trained
    assert cli.main(["eval", teacher, "--num", "80", "--steps", "2", "--spacing", "quadratic"]) == 2
    assert "a teacher takes no spacing option" in capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(root / "guided" / "steps_002"), "--spacing", "quadratic"]) == 2
    assert "a guided-distillation student takes no spacing option" in capsys.readouterr().err
    assert cli.main(["eval", teacher, "--num", "80", "--timesteps", "1.0", "0.5"]) == 2
    assert "a teacher takes no timesteps option" in capsys.readouterr().err


def test_a_progressive_round_is_refused_on_another_stitched_grid_and_as_a_collaboration_teacher(trained, tmp_path,
                                                                                                capsys):
    root, teacher, _ = trained
    round2 = str(root / "guided" / "steps_002")
    out = str(tmp_path / "s.npz")
    assert cli.main(["sample", "--workdir", teacher, "--stitch", round2, "--fractions", "0.5", "--steps", "8",
                     "--num", "4", "--out", out]) == 2
    assert "(steps_002 student) was distilled for 2 steps; stitched sampling runs a grid of 8" in capsys.readouterr().err
    assert not os.path.exists(out)
    # on its own grid it stitches (the stage-1 student takes any count)
    assert cli.main(["sample", "--workdir", teacher, "--stitch", round2, "--fractions", "0.5", "--steps", "2",
                     "--num", "4", "--out", out]) == 0
    from jdistill.errors import InvalidArgument
    from jdistill.recipes import collab

    with pytest.raises(InvalidArgument, match="distilled for 2 steps only"):
        collab.load_teacher(round2, guidance_scale=1.5)


def test_loading_never_trains_a_missing_teacher(trained, tmp_path, capsys):
    root, teacher, guided = trained
    copy = tmp_path / "guided"
    shutil.copytree(guided, copy)
    moved = tmp_path / "teacher_moved"
    shutil.move(teacher, moved)
    try:
        assert cli.main(["sample", "--workdir", str(copy), "--steps", "2", "--num", "4",
                         "--out", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err
        assert "the teacher stage is missing" in err and teacher in err
        assert not os.path.exists(teacher)  # nothing was trained in its place
    finally:
        shutil.move(moved, teacher)


def test_training_again_finds_the_run_finished(trained, capsys):
    _, teacher, _ = trained
    assert cli.main(["train", "--config", TEACHER, "--workdir", teacher, "--quiet", *TINY_TEACHER]) == 0
    assert "already finished" in capsys.readouterr().out


def test_reading_a_run_prints_no_warnings(trained, caplog, capfd):
    import logging

    from jdistill.recipes import runs

    _, teacher, guided = trained
    with caplog.at_level(logging.WARNING):
        runs.read_params(teacher, part="model")
        runs.read_config(guided, "steps_001")
        runs.open_run(guided)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "WARNING" not in capfd.readouterr().err
