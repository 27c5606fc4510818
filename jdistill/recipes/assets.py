"""Trained digits networks shipped inside the package, as the digits classifier is.

The demo reuses them instead of training each for minutes on every fresh clone:

    jdistill/assets/<name>.msgpack   the sampling params (the EMA of a finished run)
    jdistill/assets/<name>.json      the run's config, its step count and training time,
                                     and the weights' SHA-256

An asset is a teacher's whole run or one stage of a distillation (``digits_guided_stage1``: the
guidance-conditioned student that the halvings start from, ``stage`` in its record). A stage asset
records the teacher it was distilled from (``teacher.workdir`` in its config); :func:`install` points
that at the caller's copy of the shipped teacher, which is the same network.

:func:`install` turns an asset into an ordinary run (an Orbax checkpoint of its last step
in ``<workdir>/checkpoints``, config beside it), so every command reads it like a run it
trained itself; ``jdistill train`` on it finds it finished. :func:`export` makes an asset
from a finished run (``python -m jdistill.recipes.assets export WORKDIR NAME [STAGE]``). The
configs in ``configs/`` retrain each of them bit for bit (tests/test_assets.py) on the processor
and with the kernels (``"kernels"`` in the record: ``JDISTILL_REFERENCE_KERNELS=1`` for
"reference", see ``models/layers.reference_kernels``) it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

import jax
import numpy as np
from flax import serialization

from jdistill.errors import InvalidArgument, MissingInput
from jdistill.recipes import runs
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train.loop import training_seconds

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
RECIPE_PART = {"teacher": "model", "guided": "student"}


def _paths(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    return ASSETS / f"{name}.msgpack", ASSETS / f"{name}.json"


def available(name: str) -> bool:
    return all(p.is_file() for p in _paths(name))


def read(name: str) -> tuple[dict, dict]:
    """(params as numpy arrays, record) of a shipped asset; checks the SHA-256."""
    blob_path, record_path = _paths(name)
    if not available(name):
        raise MissingInput(f"no shipped network {name!r} in {ASSETS}")
    record = json.loads(record_path.read_text())
    blob = blob_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["weights_sha256"]:
        raise ValueError(f"{blob_path} does not match the SHA-256 recorded in {record_path.name}")
    return serialization.msgpack_restore(blob), record


def install(name: str, workdir: str, *, teacher_workdir: str | None = None) -> str:
    """Write asset ``name`` into ``workdir`` as a finished run or stage (unless one is there); a stage
    asset's config names ``teacher_workdir`` (required for it) as its teacher."""
    params, record = read(name)
    steps, stage, config = int(record["steps"]), record.get("stage", ""), dict(record["config"])
    if stage:
        if teacher_workdir is None:
            raise MissingInput(f"asset {name!r} is stage {stage!r} of a distillation: name its teacher's workdir")
        config["teacher"] = dict(config["teacher"], workdir=os.path.abspath(teacher_workdir))
    if runs.is_finished(workdir, stage, steps):
        return workdir
    if runs.latest_step(workdir, stage) is not None:
        raise InvalidArgument(f"{runs.checkpoint_dir(workdir, stage)} holds another run's checkpoints (step "
                              f"{runs.latest_step(workdir, stage)}); installing {name!r} would mix the two: move "
                              "it aside or use another workdir")
    part = RECIPE_PART[config.get("recipe", "teacher")]
    state = {"parts": {part: {"params": jax.tree.map(np.asarray, params)}}}
    with ckpt_lib.Checkpointer(runs.checkpoint_dir(workdir, stage), save_every=1, keep=1, async_save=False) as ck:
        ck.save(steps, state, config=config, meta={"step": steps, "asset": name}, force=True)
    with open(os.path.join(workdir, stage, "timing.json"), "w") as f:
        json.dump([{"first_step": 0, "last_step": steps, "seconds": record["train_seconds"],
                    "device": record["device"], "kernels": record.get("kernels", "unrecorded"), "asset": name}],
                  f, indent=1)
    return workdir


def export(workdir: str, name: str, stage: str = "") -> pathlib.Path:
    """Make asset ``name`` from the finished run (or ``stage`` of it) in ``workdir``: its EMA params."""
    cfg = runs.read_config(workdir, stage)
    part = RECIPE_PART[cfg.get("recipe", "teacher")]
    steps = runs.latest_step(workdir, stage)
    total = int(cfg.stage.steps) if stage else int(cfg.train.steps)
    if steps != total:
        raise MissingInput(f"{os.path.join(workdir, stage)} is not finished ({steps} of {total} steps)")
    params = jax.device_get(runs.read_params(workdir, stage, part=part, average="ema"))
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
    stage_dir = os.path.join(workdir, stage)
    timing = json.load(open(os.path.join(stage_dir, "timing.json")))
    kernels = {session.get("kernels", "unrecorded") for session in timing}  # how to retrain it bit for bit
    record = {"config": cfg.to_dict(), "steps": steps, "train_seconds": training_seconds(stage_dir),
              "device": timing[-1]["device"], "kernels": kernels.pop() if len(kernels) == 1 else "mixed",
              "weights_sha256": hashlib.sha256(blob).hexdigest()}
    if stage:
        record["stage"] = stage
    blob_path, record_path = _paths(name)
    blob_path.write_bytes(blob)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return blob_path


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[1] != "export":
        sys.exit("usage: python -m jdistill.recipes.assets export WORKDIR NAME [STAGE]")
    print(export(*sys.argv[2:]))
