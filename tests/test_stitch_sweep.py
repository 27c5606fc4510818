"""`jdistill stitch-sweep` and `stitch-pick` end to end on two tiny trained digits teachers.

The ends of the sweep are checked against each model sampled alone through its own teacher
sampler (same seed, steps, guidance): fraction 0 is the large model's FD, fraction 1 the
small one's, and every ratio is relative to the large model's own number. The table's call
counts follow the fractions. The pick, at budgets between the rows' times, is the best-FD row
within the budget (computed here), never a better one over it."""

import json
import os
import subprocess
import sys

import pytest

from jdistill import config as config_lib
from jdistill.recipes import evaluation, runs, stitch, teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.data.batch_size=32",
        "--config.train.steps=2", "--config.train.log_every=1", "--config.train.sample_every=0",
        "--config.optim.warmup=1"]
NUM, STEPS, G = 100, 4, 1.5


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory):
    """(the sweep's result, its folder, {"small" / "large": the model alone, scored through
    ``teacher.make_sampler`` + ``evaluation.score`` with the sweep's seed and batch})."""
    root = tmp_path_factory.mktemp("stitch")
    dirs = {}
    for name, extra in (("small", ["--config.model.patch_size=4", "--config.model.depth=1"]),
                        ("large", ["--config.model.depth=2"])):
        cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_teacher.py"), TINY + extra)
        dirs[name] = str(root / name)
        teacher.train(cfg, dirs[name], progress=False)
    out = str(root / "sweep")
    # one batch of NUM: a sample depends on (seed, batch size), and score() draws one batch
    result = stitch.sweep(dirs["small"], dirs["large"], steps_list=(STEPS,), fractions=[0.0, 0.5, 1.0], num=NUM,
                          batch_size=NUM, out_dir=out, progress=False, repeats=2, guidance_scale=G, seed=0)
    alone = {name: evaluation.score(teacher.make_sampler(runs.open_run(d), steps=STEPS, solver="ddim",
                                                         guidance_scale=G), NUM, seed=0, repeats=1)[0]
             for name, d in dirs.items()}
    return result, out, alone


def test_sweep_rows_follow_the_fractions(sweep_result):
    result, out, alone = sweep_result
    rows = {r["fraction"]: r for r in result["rows"]}
    # 4 DDIM steps at t = 1, 0.75, 0.5, 0.25: the small model serves t >= 1 - fraction, boundary included
    assert [(rows[f]["small_calls"], rows[f]["large_calls"]) for f in (0.0, 0.5, 1.0)] == [(0, 4), (3, 1), (4, 0)]
    # the ends are the models alone (the two models' FDs differ, so a swapped end would show)
    # (2 training steps leave both near noise: their FDs differ by ~1e-5 relative, above the 1e-6 below)
    assert alone["large"]["fd"] != pytest.approx(alone["small"]["fd"], rel=1e-6)
    for fraction, name in ((0.0, "large"), (1.0, "small")):
        assert rows[fraction]["fd"] == pytest.approx(alone[name]["fd"], rel=1e-6), name
        assert rows[fraction]["class_acc"] == alone[name]["class_acc"], name
    assert rows[0.5]["fd"] not in (pytest.approx(alone["large"]["fd"], rel=1e-6),
                                   pytest.approx(alone["small"]["fd"], rel=1e-6))
    for r in rows.values():
        assert r["fd_vs_large"] == pytest.approx(r["fd"] / alone["large"]["fd"], rel=1e-6)
        assert r["time_vs_large"] == pytest.approx(r["s_per_1000"] / rows[0.0]["s_per_1000"])
        assert 0.0 < r["fd"] < 1e4 and 0.0 <= r["class_acc"] <= 1.0
    assert result["call_cost_ratio"][STEPS] == pytest.approx(rows[0.0]["s_per_1000"] / rows[1.0]["s_per_1000"])
    for name in ("results.json", "results.md", "sweep.png", "stitch_4steps_r0.0.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert table.count("\n| 4 |") == 3 and "at 4 steps" in table
    for r in rows.values():  # the table prints the numbers of the result
        assert f"| {r['fd']:.2f} | {r['fd_vs_large']:.3f} | {r['class_acc']:.3f} |" in table


def best_within(rows, key, limit):
    """The lowest-FD row whose ``key`` is at most ``limit`` (ties: the faster), by hand."""
    best = None
    for r in rows:
        if r[key] <= limit and (best is None or (r["fd"], r["s_per_1000"]) < (best["fd"], best["s_per_1000"])):
            best = r
    return best


def test_pick_is_the_best_fd_within_the_budget(sweep_result):
    result, _, _ = sweep_result
    rows = result["rows"]
    # every budget strictly between two rows' times, relative and in seconds
    for key, arg in (("time_vs_large", "budget"), ("s_per_1000", "seconds")):
        times = sorted({r[key] for r in rows})
        for lo, hi in zip(times, times[1:]):
            limit = (lo + hi) / 2
            assert stitch.pick(result, **{arg: limit}) is best_within(rows, key, limit), (arg, limit)
    # the same rows retimed so that the lower the FD, the slower: a budget just under the slowest
    # row must give up the best FD for the second best
    by_fd = sorted(rows, key=lambda r: r["fd"])
    assert by_fd[0]["fd"] < by_fd[1]["fd"]
    retimed = [dict(r, time_vs_large=1.0 - 0.3 * i, s_per_1000=10.0 - 3 * i) for i, r in enumerate(by_fd)]
    picked = stitch.pick({"rows": retimed}, budget=0.85)
    assert picked["fd"] == by_fd[1]["fd"] and picked is best_within(retimed, "time_vs_large", 0.85)
    assert stitch.pick({"rows": retimed}, budget=1.0)["fd"] == by_fd[0]["fd"]


def test_pick_refuses_what_it_cannot_answer(sweep_result):
    result, out, _ = sweep_result
    fastest = min(result["rows"], key=lambda r: r["s_per_1000"])
    with pytest.raises(ValueError, match=f"no configuration fits the budget; the fastest is 4 steps at "
                                         f"fraction {fastest['fraction']:.1f}"):
        stitch.pick(result, budget=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        stitch.pick(result)
    # the CLI reads the JSON the sweep wrote (its keys come back as strings)
    best = best_within(result["rows"], "time_vs_large", 10.0)
    proc = subprocess.run([sys.executable, "-m", "jdistill", "stitch-pick", os.path.join(out, "results.json"),
                           "--budget", "10"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"fraction {best['fraction']:.1f}" in proc.stdout
    with open(os.path.join(out, "results.json")) as f:
        assert stitch.format_table(json.load(f)).startswith("T-Stitch sweep")
