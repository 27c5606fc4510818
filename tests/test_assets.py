"""The digits networks shipped in jdistill/assets: installed as ordinary finished runs, checked by
their SHA-256, and (slow) retrained bit for bit by the configs that made them."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from cli_helpers import REPO

from jdistill import cli
from jdistill import config as config_lib
from jdistill.errors import InvalidArgument, MissingInput
from jdistill.models import layers
from jdistill.recipes import assets, runs, teacher

SHIPPED = [n for n in ("digits_teacher", "digits_teacher_small", "digits_flow_teacher") if assets.available(n)]


@pytest.mark.parametrize("name", SHIPPED)
def test_installed_asset_is_a_finished_run(name, tmp_path, capsys):
    params, record = assets.read(name)
    workdir = assets.install(name, str(tmp_path / name))
    run = runs.open_run(workdir)
    assert run.recipe == record["config"].get("recipe", "teacher") and run.stages == ("",)
    assert runs.is_finished(workdir, "", record["steps"])
    for a, b in zip(jax.tree.leaves(runs.read_params(workdir, part="model")), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # training it again with its own config finds it finished and trains nothing
    (tmp_path / "cfg.json").write_text(json.dumps(record["config"]))
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text("import json, ml_collections\n\ndef get_config():\n"
                        f"    return ml_collections.ConfigDict(json.load(open({str(tmp_path / 'cfg.json')!r})))\n")
    assert cli.main(["train", "--config", str(cfg_path), "--workdir", workdir, "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert runs.latest_step(workdir) == record["steps"]


def test_a_damaged_asset_is_refused(tmp_path, monkeypatch):
    name = SHIPPED[0]
    blob, record = assets._paths(name)
    monkeypatch.setattr(assets, "ASSETS", tmp_path)
    shutil.copy(record, tmp_path / record.name)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / blob.name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        assets.read(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_the_config_retrains_the_asset_bit_for_bit(name, tmp_path, monkeypatch):
    params, record = assets.read(name)
    if record.get("kernels") == "reference":  # trained before the CPU speed-ups: their rounding
        monkeypatch.setenv(layers.REFERENCE_KERNELS, "1")
    cfg = config_lib.from_dict(record["config"])
    shipped_config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"))
    assert config_lib.to_dict(shipped_config) == json.loads(json.dumps(record["config"]))
    teacher.train(cfg, str(tmp_path / name), progress=False)
    trained = runs.read_params(str(tmp_path / name), part="model")
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_guided_stage1_asset_is_the_demos_finished_stage1(tmp_path, capsys):
    from jdistill.recipes import demo, guided, parts, stages, tasks

    teacher_dir = assets.install("digits_teacher", str(tmp_path / "teacher"))
    workdir = str(tmp_path / "guided")
    with pytest.raises(MissingInput, match="name its teacher's workdir"):
        assets.install(parts.GUIDED_STAGE1, workdir)
    params, record = assets.read(parts.GUIDED_STAGE1)
    assets.install(parts.GUIDED_STAGE1, workdir, teacher_workdir=teacher_dir)
    assert runs.is_finished(workdir, "stage1", record["steps"])
    for a, b in zip(jax.tree.leaves(runs.read_params(workdir, "stage1", part="student")), jax.tree.leaves(params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the demo's guided config (its teacher: the shipped one) finds stage 1 finished: nothing retrained
    cfg = demo.Demo(workdir=str(tmp_path)).config(
        "digits_guided", [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=", *parts.GUIDED_DEMO])
    stage = guided.stage1(cfg, tasks.make_task(cfg, with_data=False))
    assert stages.run(stage, workdir, cfg, batches=None) is None
    assert f"{os.path.join(workdir, 'stage1')}: finished ({record['steps']} steps), reused" in capsys.readouterr().out
    # another run's checkpoints in the way are refused, not mixed with the asset's
    other = str(tmp_path / "other")
    assets.install(parts.GUIDED_STAGE1, other, teacher_workdir=teacher_dir)
    os.rename(os.path.join(other, "stage1", "checkpoints", str(record["steps"])),
              os.path.join(other, "stage1", "checkpoints", "600"))
    with pytest.raises(InvalidArgument, match="holds another run's checkpoints"):
        assets.install(parts.GUIDED_STAGE1, other, teacher_workdir=teacher_dir)
