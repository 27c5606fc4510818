"""The notebooks in colabs/: their code is valid Python (fast), and they run end to end on the CPU
with every stage shrunk to a few steps (slow: `make test-slow`)."""

import json
import os
import pathlib
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
    assert {p.name for p in NOTEBOOKS} == {"codi.ipynb", "guided_distillation.ipynb", "t_stitch.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_compile(path):
    cells = code_cells(path)
    assert cells
    for i, src in enumerate(cells):
        compile(src, f"{path.name}[cell {i}]", "exec")


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
    assert "FD" in out.stdout
