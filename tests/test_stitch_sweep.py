"""`jdistill stitch-sweep` and `stitch-pick` end to end on two tiny trained digits teachers: the
table's call counts follow the fractions, its ratios are relative to the large model alone, and the
pick respects the budget (or says that nothing fits)."""

import json
import os
import subprocess
import sys

import pytest

from jdistill import config as config_lib
from jdistill.recipes import stitch, teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.data.batch_size=32",
        "--config.train.steps=2", "--config.train.log_every=1", "--config.train.sample_every=0",
        "--config.optim.warmup=1"]


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("stitch")
    dirs = {}
    for name, extra in (("small", ["--config.model.patch_size=4", "--config.model.depth=1"]),
                        ("large", ["--config.model.depth=2"])):
        cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_teacher.py"), TINY + extra)
        dirs[name] = str(root / name)
        teacher.train(cfg, dirs[name], progress=False)
    out = str(root / "sweep")
    result = stitch.sweep(dirs["small"], dirs["large"], steps_list=(4,), fractions=[0.0, 0.5, 1.0], num=100,
                          batch_size=50, out_dir=out, progress=False, repeats=2)
    return result, out


def test_sweep_rows_follow_the_fractions(sweep_result):
    result, out = sweep_result
    rows = {r["fraction"]: r for r in result["rows"]}
    # 4 DDIM steps at t = 1, 0.75, 0.5, 0.25: the small model serves t >= 1 - fraction, boundary included
    assert [(rows[f]["small_calls"], rows[f]["large_calls"]) for f in (0.0, 0.5, 1.0)] == [(0, 4), (3, 1), (4, 0)]
    assert rows[0.0]["fd_vs_large"] == 1.0 and rows[0.0]["time_vs_large"] == 1.0
    assert rows[0.5]["fd_vs_large"] == pytest.approx(rows[0.5]["fd"] / rows[0.0]["fd"])
    assert result["call_cost_ratio"][4] == pytest.approx(rows[0.0]["s_per_1000"] / rows[1.0]["s_per_1000"])
    assert all(r["fd"] > 0 and 0.0 <= r["class_acc"] <= 1.0 for r in rows.values())
    for name in ("results.json", "results.md", "sweep.png", "stitch_4steps_r0.0.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert table.count("\n| 4 |") == 3 and "at 4 steps" in table


def test_pick_respects_the_budget(sweep_result):
    result, out = sweep_result
    best = stitch.pick(result, budget=10.0)  # everything fits: the lowest FD wins
    assert best["fd"] == min(r["fd"] for r in result["rows"])
    tight = max(r["time_vs_large"] for r in result["rows"] if r["fraction"] == 1.0)
    assert stitch.pick(result, budget=tight)["time_vs_large"] <= tight
    with pytest.raises(ValueError, match="no configuration fits the budget"):
        stitch.pick(result, budget=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        stitch.pick(result)
    # the CLI reads the JSON the sweep wrote (its keys come back as strings)
    proc = subprocess.run([sys.executable, "-m", "jdistill", "stitch-pick", os.path.join(out, "results.json"),
                           "--budget", "10"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"fraction {best['fraction']:.1f}" in proc.stdout
    with open(os.path.join(out, "results.json")) as f:
        assert stitch.format_table(json.load(f)).startswith("T-Stitch sweep")
