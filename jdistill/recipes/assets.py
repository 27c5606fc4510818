"""Trained digits networks shipped inside the package, as the digits classifier is.

The demo reuses them instead of training each for minutes on every fresh clone:

    jdistill/assets/<name>.msgpack   the sampling params (the EMA of a finished run)
    jdistill/assets/<name>.json      the run's config, its step count and training time,
                                     and the weights' SHA-256

:func:`install` turns an asset into an ordinary run (an Orbax checkpoint of its last step
in ``<workdir>/checkpoints``, config beside it), so every command reads it like a run it
trained itself; ``jdistill train`` on it finds it finished. :func:`export` makes an asset
from a finished run (``python -m jdistill.recipes.assets export WORKDIR NAME``). The
configs in ``configs/`` retrain each of them bit for bit (tests/test_assets.py).
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

from jdistill.errors import MissingInput
from jdistill.recipes import runs
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train.loop import training_seconds

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
RECIPE_PART = {"teacher": "model"}


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


def install(name: str, workdir: str) -> str:
    """Write asset ``name`` into ``workdir`` as a finished run (unless a finished run is there)."""
    params, record = read(name)
    steps = int(record["steps"])
    if runs.is_finished(workdir, "", steps):
        return workdir
    part = RECIPE_PART[record["config"].get("recipe", "teacher")]
    state = {"parts": {part: {"params": jax.tree.map(np.asarray, params)}}}
    with ckpt_lib.Checkpointer(runs.checkpoint_dir(workdir), save_every=1, keep=1, async_save=False) as ck:
        ck.save(steps, state, config=record["config"], meta={"step": steps, "asset": name}, force=True)
    with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump([{"first_step": 0, "last_step": steps, "seconds": record["train_seconds"],
                    "device": record["device"], "asset": name}], f, indent=1)
    return workdir


def export(workdir: str, name: str) -> pathlib.Path:
    """Make asset ``name`` from the finished run in ``workdir`` (its EMA params)."""
    cfg = runs.read_config(workdir)
    part = RECIPE_PART[cfg.get("recipe", "teacher")]
    steps = runs.latest_step(workdir)
    if steps != int(cfg.train.steps):
        raise MissingInput(f"{workdir} is not finished ({steps} of {cfg.train.steps} steps)")
    params = jax.device_get(runs.read_params(workdir, part=part, average="ema"))
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
    timing = json.load(open(os.path.join(workdir, "timing.json")))
    record = {"config": cfg.to_dict(), "steps": steps, "train_seconds": training_seconds(workdir),
              "device": timing[-1]["device"], "weights_sha256": hashlib.sha256(blob).hexdigest()}
    blob_path, record_path = _paths(name)
    blob_path.write_bytes(blob)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return blob_path


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m jdistill.recipes.assets export WORKDIR NAME")
    print(export(sys.argv[2], sys.argv[3]))
