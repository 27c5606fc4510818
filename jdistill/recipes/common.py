"""What every recipe does the same way: turn config sections into a Denoiser, a mesh, a data
source, an optimizer; start or resume a train state; load a trained model back for sampling."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill import config as config_lib
from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.models import registry
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import mesh as mesh_lib
from jdistill.train import state as state_lib
from jdistill.train import step as step_lib

# Config sections that define what a checkpoint's params mean: resuming with other values
# would restore weights into a different network, so it is refused.
IDENTITY_SECTIONS = ("model", "diffusion")


def null_class_id(module) -> int | None:
    """The label that means "no class" for classifier-free guidance."""
    if hasattr(module, "num_classes") and getattr(module, "null_class", True):
        return module.num_classes  # DiT: table of num_classes + 1 rows
    if getattr(module, "num_class_embeds", None):
        return module.num_class_embeds - 1  # UNet2DModel: the last embedding row is kept for it
    return None


def denoiser_template(model_cfg, diffusion_cfg, module=None) -> Denoiser:
    """A Denoiser with no params yet: the module, its schedule, its prediction type, its null condition."""
    module = module if module is not None else registry.build_model(model_cfg)
    null = null_class_id(module)
    out_ch = getattr(module, "output_channels", None) or getattr(module, "out_channels", None)
    in_ch = module.in_channels
    return Denoiser(params=None, schedule=schedules.from_config(diffusion_cfg), module=module,
                    prediction=diffusion_cfg["prediction"], learned_variance=bool(out_ch and out_ch == 2 * in_ch),
                    null_cond=NullClass(null) if null is not None else None)


def init_params(module, seed: int):
    args, kwargs = registry.example_inputs(module)
    return module.init(jax.random.key(seed), *args, **kwargs)["params"]


def make_mesh(cfg) -> jax.sharding.Mesh:
    return mesh_lib.make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp))


def make_source(data_cfg, split: str, batch_size: int, seed: int, expected_shape=None, what="the model"):
    from jdistill.data import pipeline

    source = pipeline.make_batch_source(data_cfg.name, split, global_batch_size=batch_size, seed=seed,
                                        data_dir=data_cfg.get("data_dir"))
    if expected_shape is not None:
        source.check_image_shape(expected_shape, what=what)
    return source


def make_optimizer(optim_cfg, steps: int, trainable_mask=None):
    return state_lib.make_optimizer(
        float(optim_cfg.lr), steps, warmup=int(optim_cfg.warmup), decay=optim_cfg.decay,
        end_factor=float(optim_cfg.get("end_factor", 0.0)), b1=float(optim_cfg.get("b1", 0.9)),
        b2=float(optim_cfg.get("b2", 0.999)), weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        clip_norm=optim_cfg.get("clip_norm", 1.0), trainable_mask=trainable_mask)


def check_same_identity(stored: dict, current: dict, directory: str, sections=IDENTITY_SECTIONS):
    """Refuse to resume a checkpoint made by a different network, noise process or stage."""
    for section in sections:
        a, b = stored.get(section), current.get(section)
        if a is None or b is None:
            continue
        a, b = _normalise(a), _normalise(b)
        if a != b:
            diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            detail = ", ".join(f"{section}.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}" for k in diffs)
            raise config_lib.ConfigError(f"the checkpoint in {directory} was made with a different "
                                         f"{section} config ({detail}); use a new workdir or the same config")


def _normalise(d):
    if isinstance(d, dict):
        return {k: _normalise(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_normalise(v) for v in d]
    return d


def start_or_resume(checkpointer: ckpt_lib.Checkpointer | None, init_fn: Callable, mesh, identity: dict,
                    sections=IDENTITY_SECTIONS, rules=(), min_size: int = 2**14, jit_init: bool = True):
    """The latest checkpoint restored into its shardings, or a fresh state.

    ``identity`` is the config this run would store; its ``sections`` must equal the
    checkpoint's. ``jit_init``: make a random init directly in its shardings (each device
    builds its shard); False runs ``init_fn`` eagerly and places the result, for states
    started from existing params (no multi-GB constants baked into a compiled init).
    """
    abstract = jax.eval_shape(init_fn)
    shardings = step_lib.state_shardings(abstract, mesh, rules, min_size)
    if checkpointer is not None and checkpointer.latest_step() is not None:
        check_same_identity(checkpointer.read_config(), identity, checkpointer.directory, sections)
        state, _, _ = checkpointer.restore(ckpt_lib.abstract_like(abstract, shardings))
        return state
    if jit_init:
        return jax.jit(init_fn, out_shardings=shardings)()
    return step_lib.place(jax.device_get(init_fn()), shardings)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def load_trained(workdir: str, make_state: Callable[[ml_collections.ConfigDict], Callable], *, step=None,
                 use_ema: bool = True):
    """(config, params) of a finished or running training in ``workdir`` on the default device.

    ``make_state(cfg)`` returns the recipe's ``init_fn`` (it fixes the state's structure).
    """
    ck = ckpt_lib.Checkpointer(checkpoint_dir(workdir), read_only=True)
    cfg = config_lib.from_dict(ck.read_config(step))
    init_fn = make_state(cfg)
    abstract = jax.eval_shape(init_fn)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state, _, _ = ck.restore(ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: dev, abstract)), step)
    params = state.ema_params if use_ema and state.ema_params is not None else state.params
    return cfg, params


def class_labels_for(num: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., K-1, 0, 1, ... (balanced classes for evaluation)."""
    return (np.arange(num) % num_classes).astype(np.int32)


def as_float(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)
