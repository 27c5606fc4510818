"""The notebooks in colabs/: their code is valid Python (fast), and they run end to end on the CPU
with every stage shrunk to a few steps (slow: `make test-slow`); the tables they print are the
numbers in the results.json they wrote, and those numbers are sane."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def code_cells(path):
    with open(path) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == {"adaptive_collaboration.ipynb", "codi.ipynb", "guided_distillation.ipynb",
                                           "ladd.ipynb", "t_stitch.ipynb"}
    assert set(CHECKS) == {p.name for p in NOTEBOOKS}  # every notebook's printed numbers are checked


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_compile(path):
    cells = code_cells(path)
    assert cells
    for i, src in enumerate(cells):
        compile(src, f"{path.name}[cell {i}]", "exec")


HEADERS = ("model", "steps", "g", "budget", "claim", "task")  # first cells of the tables' header rows


def printed_rows(stdout: str, columns: int) -> list[list[str]]:
    """The cells of every printed Markdown table row with ``columns`` cells (headers and rules excluded)."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == columns and cells[0] not in HEADERS:
            rows.append(cells)
    return rows


def sane_fd(fd: float) -> bool:
    """Digits FDs in the shipped classifier's features: a finite positive number, far below what
    images of noise score (hundreds)."""
    return math.isfinite(fd) and 0.0 < fd < 1000.0


def check_guided(stdout: str, work: pathlib.Path):
    with open(work / "runs" / "colab_guided" / "table" / "results.json") as f:
        result = json.load(f)
    printed = printed_rows(stdout, 7)
    assert len(printed) == len(result["rows"]) == 8  # teacher at 4, 8, 64 steps; students 1, 2, 4 ddim + 2, 4 stochastic
    for cells, row in zip(printed, result["rows"]):
        assert cells[:3] == [row["model"], row["mode"], str(row["steps"])]
        assert float(cells[4]) == round(row["fd"], 2) and float(cells[5]) == round(row["class_acc"], 3)
        assert sane_fd(row["fd"]) and 0.0 <= row["class_acc"] <= 1.0 and row["s_per_1000"] > 0
    claims = printed_rows(stdout, 5)
    assert [c[1] for c in claims] == [c["claim"] for c in result["checks"]]


def check_stitch(stdout: str, work: pathlib.Path):
    with open(work / "runs" / "colab_stitch" / "sweep" / "results.json") as f:
        result = json.load(f)
    printed = printed_rows(stdout, 9)
    assert [float(c[1]) for c in printed] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    large = result["rows"][0]["fd"]
    for cells, row in zip(printed, result["rows"], strict=True):
        assert float(cells[4]) == round(row["fd"], 2) and float(cells[5]) == round(row["fd"] / large, 3)
        assert int(cells[2]) + int(cells[3]) == 16 and sane_fd(row["fd"])
    # the pick line: the lowest FD among the rows within 70% of the large model's time
    within = [r for r in result["rows"] if r["s_per_1000"] / result["rows"][0]["s_per_1000"] <= 0.7]
    best = min(within, key=lambda r: (r["fd"], r["s_per_1000"]))
    line = re.search(r"within 70% of the large model's time: fraction ([0-9.]+) -> FD ([0-9.]+)", stdout)
    assert line and (float(line[1]), float(line[2])) == (round(best["fraction"], 1), round(best["fd"], 2))


def check_codi(stdout: str, work: pathlib.Path):
    results = {}
    for name in ("lcm_table", "codi_table"):
        with open(work / "runs" / "colab_codi" / name / "results.json") as f:
            results[name] = json.load(f)
    lcm, codi = results["lcm_table"], results["codi_table"]
    printed = printed_rows(stdout, 7)
    assert len(printed) == len(lcm["rows"]) == 6  # teacher at 4, 64 steps; student lcm 1, 2, 4 and codi 4
    for cells, row in zip(printed, lcm["rows"]):
        assert cells[:3] == [row["model"], row["mode"], str(row["steps"])]
        # a smoke run's few-step LCM student is far from the data (FD above noise's): finite and positive
        assert float(cells[4]) == round(row["fd"], 2) and 0.0 < row["fd"] < math.inf and row["s_per_1000"] > 0
    printed = printed_rows(stdout, 9)
    assert len(printed) == len(codi["rows"]) == 8  # finetune at 50, 4; codi and pe_codi at 1, 2, 4
    for cells, row in zip(printed, codi["rows"]):
        assert cells[1:4] == [row["method"], row["sampler"], str(row["steps"])]
        assert float(cells[4]) == round(row["psnr"], 2) and float(cells[6]) == round(row["fd"], 2)
        assert 0 < row["psnr"] < 100 and -1 <= row["ssim"] <= 1 and 0.0 < row["fd"] < math.inf and row["s_per_1000"] > 0
    claims = printed_rows(stdout, 5)
    assert [c[1] for c in claims] == [c["claim"] for c in lcm["checks"] + codi["checks"]]



def check_collab(stdout: str, work: pathlib.Path):
    with open(work / "runs" / "colab_collab" / "sweep" / "results.json") as f:
        result = json.load(f)
    rows = result["rows"]
    assert {r["strategy"] for r in rows} >= {"student"} and len(rows) > 1
    assert all(sane_fd(r["fd"]) and r["avg_evals"] > 0 and 0.0 <= r["class_acc"] <= 1.0 for r in rows)
    # the summary table prints one row per strategy per budget, its FDs those of results.json
    printed = printed_rows(stdout, 8)
    fds = {round(r["fd"], 2) for r in rows}
    assert printed and all(float(c[5]) in fds for c in printed)
    # the pick line: the lowest FD among the rows whose measured evaluations fit 10
    best = min((r for r in rows if r["avg_evals"] <= 10), key=lambda r: (r["fd"], r["avg_evals"]))
    line = re.search(r"within 10 evaluations: (.+) -> FD ([0-9.]+), ([0-9.]+) evaluations", stdout)
    assert line and line[1] == best["sampler"] and float(line[2]) == round(best["fd"], 2)
    assert float(line[3]) == round(best["avg_evals"], 2)


def check_ladd(stdout: str, work: pathlib.Path):
    with open(work / "runs" / "colab_ladd" / "table" / "results.json") as f:
        result = json.load(f)
    printed = printed_rows(stdout, 6)
    assert len(printed) == len(result["rows"]) == 5  # teacher at 1, 4, 64 steps; the LADD student at 1, 4
    for cells, row in zip(printed, result["rows"]):
        assert cells[:3] == [row["model"], row["mode"], str(row["steps"])]
        assert float(cells[3]) == round(row["fd"], 2) and float(cells[4]) == round(row["class_acc"], 3)
        assert sane_fd(row["fd"]) and 0.0 <= row["class_acc"] <= 1.0 and row["s_per_1000"] > 0
    claims = printed_rows(stdout, 4)
    assert [c[0] for c in claims] == [c["claim"] for c in result["checks"]]


CHECKS = {"codi.ipynb": check_codi, "ladd.ipynb": check_ladd, "guided_distillation.ipynb": check_guided, "t_stitch.ipynb": check_stitch,
          "adaptive_collaboration.ipynb": check_collab}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_end_to_end(path, tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(code_cells(path)))
    env = dict(os.environ, JDISTILL_NOTEBOOK_SMOKE="1", JAX_NUM_CPU_DEVICES="1")
    work = tmp_path / "colabs"
    work.mkdir()
    out = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    CHECKS[path.name](out.stdout, work)
