"""What every recipe does the same way: turn config sections into a mesh, a data source and
initial params, and check what a user asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.errors import InvalidArgument, check_finite, check_positive_int
from jdistill.models import registry
from jdistill.train import mesh as mesh_lib

__all__ = ["EXECUTION_FIELDS", "InvalidArgument", "as_float", "check_sampling", "check_steps", "check_train_config",
           "class_labels_for", "init_params", "make_mesh", "make_source", "plan_settings", "refuse_options"]


def init_params(module, seed: int):
    args, kwargs = registry.example_inputs(module)
    return module.init(jax.random.key(seed), *args, **kwargs)["params"]


def make_mesh(cfg) -> jax.sharding.Mesh:
    return mesh_lib.from_config(cfg.mesh)


def make_source(data_cfg, split: str, batch_size: int, seed: int, expected_shape=None, what="the model"):
    from jdistill.data import pipeline

    source = pipeline.make_batch_source(data_cfg.name, split, global_batch_size=batch_size, seed=seed,
                                        data_dir=data_cfg.get("data_dir"))
    if expected_shape is not None:
        source.check_image_shape(expected_shape, what=what)
    return source


def check_steps(value, key: str) -> int:
    """A step count from a config (``train.steps``, ``stage1.steps``): an integer >= 1."""
    return check_positive_int(f"--config.{key}", value)


def check_train_config(cfg, mesh=None) -> None:
    """The sections every training recipe reads: each value named when out of range. ``mesh``:
    the one training will use (default: the config's)."""
    check_positive_int("--config.seed", cfg.seed, minimum=0)
    batch = check_positive_int("--config.data.batch_size", cfg.data.batch_size)
    t = cfg.train
    decay = check_finite("--config.train.ema_decay", t.ema_decay, minimum=0.0)
    if decay >= 1.0:
        raise InvalidArgument(f"--config.train.ema_decay must be in [0, 1) (0: no EMA), got {decay:g}")
    for key in ("log_every", "ckpt_every", "keep"):
        check_positive_int(f"--config.train.{key}", t[key])
    check_positive_int("--config.train.sample_every", t.get("sample_every", 0), minimum=0)
    from jdistill.train.loop import NONFINITE_POLICIES

    if t.get("nonfinite", "stop") not in NONFINITE_POLICIES:
        raise InvalidArgument(f"--config.train.nonfinite={t.nonfinite!r}; expected one of {NONFINITE_POLICIES}")
    ratio = t.get("max_update_ratio")
    if ratio is not None and not check_finite("--config.train.max_update_ratio", ratio) > 0:
        raise InvalidArgument(f"--config.train.max_update_ratio must be > 0 (None: no divergence guard), got {ratio:g}")
    if "loss" in cfg and "cond_drop_prob" in cfg.loss:
        p = check_finite("--config.loss.cond_drop_prob", cfg.loss.cond_drop_prob, minimum=0.0)
        if p > 1.0:
            raise InvalidArgument(f"--config.loss.cond_drop_prob must be in [0, 1], got {p:g}")
    sample = cfg.get("sample") or {}
    check_sampling(sample.get("steps"), sample.get("solver"), sample.get("guidance_scale"), prefix="--config.sample.")
    mesh = mesh if mesh is not None else make_mesh(cfg)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows:
        raise InvalidArgument(f"--config.data.batch_size={batch} does not split over the {rows} data-parallel "
                              f"devices of the mesh (data x fsdp); use a multiple of {rows}")


def check_sampling(steps=None, solver=None, guidance_scale=None, *, prefix: str = "--") -> None:
    """Sampling options as a user gives them (None: the run's default)."""
    from jdistill.sampling.samplers import SOLVERS

    check_positive_int(f"{prefix}steps", steps, allow_none=True)
    if solver is not None and solver not in SOLVERS:
        raise InvalidArgument(f"{prefix}solver={solver!r}; expected one of {', '.join(SOLVERS)}")
    check_finite(f"{prefix}guidance{'_scale' if prefix != '--' else ''}", guidance_scale, allow_none=True)


def refuse_options(options: dict, what: str) -> None:
    """Sampling options a recipe has no use for are an error, not silently dropped."""
    given = sorted(k for k, v in options.items() if v not in (None, False))
    if given:
        raise InvalidArgument(f"{what} takes no {', '.join(given)} option(s)")


def class_labels_for(num: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., K-1, 0, 1, ... (balanced classes for evaluation)."""
    return (np.arange(num) % num_classes).astype(np.int32)


def as_float(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# how a pretrained network runs, not what it is: the only ``model`` fields training sets on one
# (``tasks.with_model_fields``)
EXECUTION_FIELDS = ("remat", "dtype")


def plan_settings(cfg) -> dict:
    """The config keys a plan's advice may name for this config's networks (setting -> key): a
    pretrained pipeline's network takes only the execution options (:data:`EXECUTION_FIELDS`), so
    a plan never advises e.g. ``model.param_dtype``, which training on that pipeline refuses."""
    from jdistill.plan.steps import MODEL_SETTINGS

    if cfg.teacher.get("pipeline"):
        return {k: v for k, v in MODEL_SETTINGS.items() if k in EXECUTION_FIELDS}
    return dict(MODEL_SETTINGS)
