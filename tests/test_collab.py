"""Adaptive collaboration on runs (recipes/collab.py, collab_sweep.py), plugged in through their
recipes. Default tests take the shipped digits teacher (installed, no training) as the teacher and,
sampled with 1 DDIM + CFG step through its recipe's sampler, as the student: k = 0 reproduces the
student alone bit for bit; tau is numpy's percentile of the oracle's scores of the student's own
samples; a calibration file refuses other settings. Slow: a tiny guided-distillation student (a
guidance-input student, one pass a step); the CLI refuses a mismatched calibration in one line; the
sweep's budget accounting follows its selections, and collab-pick respects the budget. A budget is a
cap: every strategy's step count fits it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.metrics import oracles
from jdistill.recipes import assets, collab, collab_report, collab_sweep, collab_t2i, guided
from jdistill.sampling.generate import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDED = ["--config.stage1.steps=2", "--config.progressive.start_steps=1", "--config.progressive.train_steps.1=2",
          "--config.data.batch_size=32", "--config.train.log_every=1", "--config.stage1.optim.warmup=1",
          "--config.progressive.optim.warmup=1"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """(root, the shipped teacher as a finished run)."""
    root = tmp_path_factory.mktemp("collab")
    return root, assets.install("digits_teacher", str(root / "teacher"))


@pytest.fixture(scope="module")
def runs_dir(shipped):
    """(root, teacher, a tiny guided student's 1-step run): slow tests only (it trains)."""
    root, teacher_dir = shipped
    student_dir = str(root / "guided")
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_guided.py"),
                                 GUIDED + [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config="])
    guided.train(cfg, student_dir, progress=False)
    return root, teacher_dir, os.path.join(student_dir, "steps_001")


def student_images(student, num, seed):
    labels = student.sampler.labels(num)
    images, _ = generate(student.sampler.fn, student.sampler.image_shape, labels, num=num, batch_size=20, seed=seed)
    return images, labels


def test_k0_is_the_student_alone_bit_for_bit(shipped):
    _, teacher_dir = shipped
    student = collab.load_student(teacher_dir, steps=1, guidance_scale=1.5)
    assert student.evaluations == 2  # one DDIM step with CFG: two passes
    tchr, members = collab.load_teacher(teacher_dir, guidance_scale=1.5)
    calib = collab.Calibration(np.sort(np.random.default_rng(0).standard_normal(50)), {})
    sampler = collab.collab_sampler(student, oracles.get("digits_confidence"), tchr, members,
                                    collab_sweep.refinement("paper", 0.6, 3, "ddim"), calib.tau(0), buckets=4)
    labels = student.sampler.labels(40)
    got, _ = generate(sampler.fn, sampler.image_shape, labels, num=40, batch_size=20, seed=0)
    alone, _ = student_images(student, 40, 0)
    np.testing.assert_array_equal(got, alone)
    assert sampler.plan.budget() == {"refined_share": 0.0, "avg_steps": 1.0, "avg_evals": 2.0, "padded_evals": 2.0}


def test_tau_is_numpys_percentile_and_mismatched_settings_are_refused(shipped):
    root, student_dir = shipped
    student = collab.load_student(student_dir, steps=1, guidance_scale=1.5)
    oracle = oracles.get("digits_confidence")
    calib = collab.calibrate(student, oracle, num=40, seed=1, batch_size=20)
    images, labels = student_images(student, 40, 1)  # the same samples, scored again independently
    logits = np.asarray(oracles.digits_oracle_classifier().logits(images), np.float64)
    ratio = np.exp(logits - logits[np.arange(40), labels][:, None])  # p_j / p_label
    others = np.arange(10)[None, :] != labels[:, None]
    own = -np.log((ratio * others).sum(-1))  # log(p / (1 - p)) of the label = -log(sum_{j != label} p_j / p_label)
    for k in (10, 30, 50, 75, 90):
        assert calib.tau(k) == pytest.approx(float(np.percentile(own, k)), rel=1e-5, abs=1e-6)
    assert np.mean(own < calib.tau(50)) == 0.5  # log-odds do not saturate: no ties at the median
    assert (calib.tau(0), calib.tau(100)) == (float("-inf"), float("inf"))

    path = calib.save(str(root / "calib.json"))
    again = collab.Calibration.load(path)
    np.testing.assert_array_equal(again.scores, calib.scores)
    same = collab.calibration_settings(student, oracle, 40, 1)
    again.check(json.loads(json.dumps(same)))  # the settings it was made with pass
    other_g = collab.load_student(student_dir, steps=1, guidance_scale=2.0)
    with pytest.raises(collab.CalibrationMismatch, match="calibrated with .*1.5.* used with .*2.0"):
        again.check(collab.calibration_settings(other_g, oracle, 40, 1))
    other_oracle = oracles.Oracle("other", lambda x, y: np.zeros(len(x)), {"oracle": "other"})
    with pytest.raises(collab.CalibrationMismatch, match="oracle"):
        again.check(collab.calibration_settings(student, other_oracle, 40, 1))
    with pytest.raises(collab.CalibrationMismatch, match="set_size"):
        again.check(collab.calibration_settings(student, oracle, 41, 1))
    # as the sweep reads it: the file's own size unless one is asked for, and never the evaluation's seed
    assert collab_sweep._calibration(student, oracle, path, None, str(root), seed=0).settings == calib.settings
    with pytest.raises(collab.CalibrationMismatch, match="set_size: calibrated with 40, used with 100"):
        collab_sweep._calibration(student, oracle, path, 100, str(root), seed=0)
    with pytest.raises(collab.CalibrationMismatch, match="drawn at seed 1, the evaluation's own"):
        collab_sweep._calibration(student, oracle, path, None, str(root), seed=1)
    with pytest.raises(collab.CalibrationMismatch, match="drawn at seed 1, the evaluation's own"):
        collab_sweep._calibration(student, oracle, None, 40, str(root / "inline"), seed=collab.CALIBRATION_SEED)


def test_a_sweep_budget_is_a_cap_every_strategy_fits():
    """Each strategy's teacher steps are the most that fit the budget (its rows compare at no more
    than B evaluations, as collab-pick reads them). Python's round (half to even) gave
    refine-everything 4 steps at B = 8 (9 evaluations) and 6 at B = 12 (13)."""
    for budget in range(3, 15):
        for spent, share in ((0, 1.0), (1, 1.0), (1, 0.9), (1, 0.7), (1, 0.5), (1, 0.3)):
            steps = collab_sweep.teacher_steps(budget, spent, share, 2)
            assert spent + steps * 2 * share <= budget + 1e-9 or steps == 1
            assert spent + (steps + 1) * 2 * share > budget + 1e-9
    assert [collab_sweep.teacher_steps(b, 1, 1.0, 2) for b in (6, 8, 10, 12)] == [2, 3, 4, 5]
    assert [collab_sweep.teacher_steps(b, 1, 0.9, 2) for b in (6, 8, 10, 12)] == [2, 3, 5, 6]  # 9 / 1.8 = 5 exactly
    assert [collab_sweep.teacher_steps(b, 0, 1.0, 2) for b in (7, 8)] == [3, 4]  # the teacher alone


@pytest.mark.slow
def test_sweep_accounting_pick_and_the_cli(runs_dir):
    root, teacher_dir, student_dir = runs_dir
    student = collab.load_student(student_dir, steps=1, guidance_scale=1.5)
    assert student.evaluations == 1  # guidance is the student's input: one pass a step
    path = collab.calibrate(student, oracles.get("digits_confidence"), num=40, seed=1, batch_size=20).save(
        str(root / "guided_calib.json"))
    proc = subprocess.run([sys.executable, "-m", "jdistill", "collab-sweep", "--student", student_dir, "--teacher",
                           runs_dir[1], "--calibration", path, "--guidance", "2.0", "--out", str(root / "refused")],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "calibration does not fit" in error[0] and "guidance_scale" in error[0]

    out = str(root / "sweep")
    result = collab_sweep.sweep(student_dir, teacher_dir, budgets=(5,), ks=(50,), sigmas=(0.5,), reference_steps=4,
                                num=100, calibration_num=100, out_dir=out, repeats=1, progress=False)
    rows = result["rows"]
    by = {(r["strategy"], r["budget"]): r for r in rows}
    assert by[("student", None)]["avg_evals"] == 1 and by[("teacher", None)]["avg_evals"] == 8
    assert by[("teacher", 5)]["teacher_steps"] == 2 and by[("refine_all", 5)]["teacher_steps"] == 2
    assert by[("refine_all", 5)]["avg_evals"] == 5.0  # 1 + 2 steps x 2 passes on every sample
    adaptive = by[("adaptive_refine", 5)]
    assert adaptive["teacher_steps"] == 4  # (5 - 1) / (2 x 0.5)
    assert adaptive["avg_evals"] == pytest.approx(1 + adaptive["refined_share"] * 8)
    assert adaptive["padded_evals"] >= adaptive["avg_evals"]
    assert 0.3 <= adaptive["refined_share"] <= 0.7  # k = 50 on samples drawn apart from the calibration's
    for name in ("results.json", "results.md", "sweep.png", "calibration.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # the teacher's rows name the sweep's solver (every teacher run of the sweep uses it)
    assert "| ~5 | teacher alone (DDIM + CFG) |" in collab_report.summary_table(result)
    assert "teacher alone (DPM-Solver++ 2M + CFG)" in collab_report.full_table(dict(result, solver="dpmpp_2m"))
    assert {c["claim"].split(":")[0] for c in result["checks"]} >= {"~5 evaluations"}
    for strategy in ("teacher", "refine_all", "adaptive_refine"):  # the claims read rows within the cap
        fits = [r for r in rows if r["strategy"] == strategy and r["budget"] and r["avg_evals"] <= 5.0]
        assert collab_report.best(rows, strategy, 5.0) == (min(fits, key=lambda r: r["fd"]) if fits else None)
    best = collab_sweep.pick(result, 5.0)
    assert best["avg_evals"] <= 5.0 and best["fd"] == min(r["fd"] for r in rows if r["avg_evals"] <= 5.0)
    with pytest.raises(ValueError, match="nothing fits"):
        collab_sweep.pick(result, 0.5)
    proc = subprocess.run([sys.executable, "-m", "jdistill", "collab-pick", os.path.join(out, "results.json"),
                           "--budget", "5"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"FD {best['fd']:.2f}" in proc.stdout


def test_realism_oracle_is_kynkaanniemis_score_and_ranks_real_digits_of_their_class_first():
    """digits_realism against the formula by brute force (sklearn's nearest neighbours, a python
    loop over the kept real rows), and as an oracle: held-out digits of their own class score
    higher than the same digits taken as another class, and than noise."""
    from sklearn.neighbors import NearestNeighbors

    from jdistill.data.digits import digits_arrays

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 5)), rng.normal(size=(7, 5)) * 1.5
    k = 3
    radii = NearestNeighbors(n_neighbors=k + 1).fit(real).kneighbors(real)[0][:, k]
    kept = [i for i in range(len(real)) if radii[i] <= np.median(radii)]
    want = [max(radii[i] / np.linalg.norm(f - real[i]) for i in kept) for f in fake]
    np.testing.assert_allclose(oracles.realism_scores(fake, real, k), want, rtol=1e-12)
    # distances a block of rows at a time (memory) are the one-call broadcast's, bit for bit
    one_call = np.sqrt(np.maximum(((real[:, None, :] - real[None, :, :]) ** 2).sum(-1), 0.0))
    np.testing.assert_array_equal(oracles._distances(real, real, rows=3), one_call)

    oracle = oracles.get("digits_realism")
    test = digits_arrays("test")
    own = oracle.score(test["image"], test["label"])
    other = oracle.score(test["image"], (test["label"] + 1) % 10)
    noise = oracle.score(rng.uniform(-1, 1, (100, 8, 8, 1)).astype(np.float32), test["label"][:100])
    assert np.median(own) > 3 * max(np.median(other), np.median(noise))
    assert (own > other).mean() > 0.95
    assert oracle.provenance["oracle"] == "digits_realism" and oracle.provenance["k"] == 3


def test_calibration_noise_is_no_evaluation_batchs():
    """Text-to-image collaboration: evaluation batch b at seed s draws from key(s + b); calibration batches from a stream of their own."""
    drawn = {tuple(np.asarray(jax.random.key_data(jax.random.key(s))).tolist()) for s in range(64)}
    for seed in (0, 1, 2):
        for b in range(8):
            key = collab_t2i.calibration_key(seed, b)
            assert tuple(np.asarray(jax.random.key_data(key)).tolist()) not in drawn
