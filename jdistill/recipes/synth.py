"""Synthetic data: a teacher's samples (with CFG), generated once into shards that training reads.

    jdistill synth --config configs/digits_ladd.py        (the config's ``teacher`` and ``synth``)

LADD trains on teacher-generated data only. :func:`generate` writes ``<dir>/manifest.json``
(the teacher, the sampler, the conditions, the count), then ``shard_00000.npz``, ...: ``image``
float32 NHWC in the teacher's sample space (pixels, or latents for a pipeline), and ``label``
(class ids) or ``caption`` (ids into the manifest's ``prompts``). Shard k's noise comes from
``fold_in(key(seed), k)`` and its conditions are the indices k S .. (k + 1) S - 1 taken modulo
the classes / prompts, so a run killed at any point and started again writes exactly what an
uninterrupted one would: a shard is written under a temporary name and renamed when complete,
complete shards are kept, the others generated. :func:`task` is the distillation task whose
data source reads the shards (a grain ``BatchSource``, exact resume by step).
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from jdistill import config as config_lib
from jdistill.diffusion.timesteps import make_grid
from jdistill.errors import InvalidArgument, MissingInput, check_positive_int
from jdistill.models import registry
from jdistill.recipes import tasks
from jdistill.sampling import samplers

MANIFEST = "manifest.json"


def synth_dir(cfg) -> str:
    """``synth.dir``, or a folder under ``runs/synth`` named after the teacher and the sampler."""
    s = cfg.synth
    if s.get("dir"):
        return s.dir
    teacher = os.path.basename(os.path.normpath(cfg.teacher.get("workdir") or cfg.teacher.get("pipeline")))
    return os.path.join("runs", "synth", f"{teacher}_{s.solver}{int(s.steps)}_g{float(s.guidance_scale):g}_"
                                         f"n{int(s.num)}_seed{int(s.seed)}")


def manifest(cfg) -> dict:
    """What the shards are: equal manifests, equal shards."""
    s = cfg.synth
    teacher = config_lib.to_dict(cfg.teacher)
    teacher.pop("config", None)  # how a missing teacher would be trained, not which one it is
    if teacher.get("workdir"):
        teacher["workdir"] = os.path.abspath(teacher["workdir"])
    prompts = list(s.get("prompts") or ())
    if s.get("prompts_file"):
        if not os.path.isfile(s.prompts_file):
            raise MissingInput(f"no prompts file at {s.prompts_file} (--config.synth.prompts_file: one prompt a line)")
        with open(s.prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
    if cfg.teacher.get("pipeline") and not prompts:
        raise InvalidArgument("a text-to-image teacher's synthetic data need --config.synth.prompts")
    return {"teacher": teacher, "num": check_positive_int("--config.synth.num", s.num),
            "shard_size": check_positive_int("--config.synth.shard_size", s.shard_size),
            "steps": check_positive_int("--config.synth.steps", s.steps), "solver": s.solver,
            "guidance_scale": float(s.guidance_scale), "seed": int(s.seed),
            "condition": "caption" if prompts else "label", "prompts": prompts}


def num_shards(m: dict) -> int:
    return math.ceil(m["num"] / m["shard_size"])


def shard_path(directory: str, k: int) -> str:
    return os.path.join(directory, f"shard_{k:05d}.npz")


def _check_manifest(directory: str, m: dict) -> None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        stored = json.load(f)
    diffs = sorted(k for k in set(stored) | set(m) if stored.get(k) != m.get(k))
    if diffs:
        raise InvalidArgument(f"{directory} holds synthetic data made with other settings ("
                              + ", ".join(f"{k}: {stored.get(k)!r} there vs {m.get(k)!r}" for k in diffs)
                              + "); set --config.synth.dir to a new folder")


def task(cfg, with_data: bool = True) -> tasks.Task:
    """The task of a config trained on synthetic data: its teacher and conditions, and (``with_data``)
    a source reading the shards (which must be complete)."""
    t = tasks.make_task(cfg, with_data=False, captions=manifest(cfg)["prompts"] or None)
    if with_data:
        t.source = data_source(cfg, t)
    return t


def data_source(cfg, t: tasks.Task):
    """A BatchSource over the complete shards (``data.batch_size`` rows a step, shuffled by ``seed``)."""
    return source(synth_dir(cfg), manifest(cfg), int(cfg.data.batch_size), int(cfg.seed),
                  registry.image_shape(t.teacher.module))


def generate(cfg, *, progress: bool = True, teacher_task: tasks.Task | None = None) -> str:
    """Write the shards ``cfg.synth`` describes that are not written yet; returns the folder.
    ``teacher_task``: the config's task when the caller has built it already."""
    m = manifest(cfg)
    directory = synth_dir(cfg)
    _check_manifest(directory, m)
    todo = [k for k in range(num_shards(m)) if not os.path.isfile(shard_path(directory, k))]
    if not todo:
        return directory
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(m, f, indent=1)
    t = teacher_task or task(cfg, with_data=False)
    teacher, shape = t.teacher, registry.image_shape(t.teacher.module)
    modulus = len(m["prompts"]) or t.num_classes
    grid = make_grid(teacher.schedule, m["steps"], m["solver"])
    g = m["guidance_scale"]
    batch = check_positive_int("--config.synth.batch_size", cfg.synth.get("batch_size", 500))
    key = jax.random.key(m["seed"])
    for k in tqdm(todo, desc=f"synthetic data -> {directory}", disable=not progress):
        n = min(m["shard_size"], m["num"] - k * m["shard_size"])
        shard_key = jax.random.fold_in(key, k)
        noise = jax.random.normal(jax.random.fold_in(shard_key, 0), (n, *shape))
        ids = ((k * m["shard_size"] + np.arange(n)) % modulus).astype(np.int32)
        images = []
        for i in range(0, n, batch):
            rows = {m["condition"]: ids[i:i + batch]}
            uncond = t.uncond_fn(rows) if t.uncond_fn is not None else None
            images.append(np.asarray(samplers.sample_jit(
                teacher, noise[i:i + batch], t.cond_fn(rows), grid=grid, solver=m["solver"],
                guidance_scale=None if g == 1.0 else g, uncond=uncond, rng=jax.random.fold_in(shard_key, 1 + i))))
        tmp = shard_path(directory, k) + ".tmp.npz"
        np.savez(tmp, image=np.concatenate(images).astype(np.float32), **{m["condition"]: ids})
        os.replace(tmp, shard_path(directory, k))
    return directory


def load(directory: str, m: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images, condition ids) of complete synthetic data."""
    missing = [k for k in range(num_shards(m)) if not os.path.isfile(shard_path(directory, k))]
    if missing or not os.path.isfile(os.path.join(directory, MANIFEST)):
        raise MissingInput(f"the synthetic data in {directory} are incomplete ({len(missing)} of {num_shards(m)} "
                           "shards missing): generate them with `jdistill synth --config CONFIG`")
    _check_manifest(directory, m)
    images, ids = [], []
    for k in range(num_shards(m)):
        with np.load(shard_path(directory, k)) as f:
            images.append(f["image"])
            ids.append(f[m["condition"]])
    return np.concatenate(images), np.concatenate(ids)


def source(directory: str, m: dict, batch_size: int, seed: int, image_shape):
    from jdistill.data.pipeline import BatchSource

    images, ids = load(directory, m)
    key = m["condition"]
    records = [{"image": images[i], key: ids[i]} for i in range(len(images))]
    return BatchSource(records, global_batch_size=batch_size, seed=seed, image_shape=image_shape,
                       keys=("image", key), name=f"synthetic data {directory}")
