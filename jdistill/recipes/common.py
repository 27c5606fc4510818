"""What every recipe does the same way: turn config sections into a mesh, a data source and
initial params, and check what a user asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.errors import InvalidArgument, check_positive_int
from jdistill.models import registry
from jdistill.train import mesh as mesh_lib

__all__ = ["InvalidArgument", "as_float", "check_steps", "class_labels_for", "init_params", "make_mesh",
           "make_source", "refuse_options"]


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
