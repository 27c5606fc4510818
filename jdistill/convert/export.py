"""Flax params -> a diffusers / transformers model folder that ``from_pretrained`` loads.

No key name is written by hand: the PyTorch class is built on the meta device (no
memory, no initialisation) from the config, its ``state_dict()`` gives every key and
shape, and ``engine.flax_to_torch_state_dict`` finds each key's Flax leaf through the
family's ``export_rules`` (the loading rules, run forwards) and the engine's layout rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Mapping

import jax
import numpy as np

from jdistill.convert import engine, registry
from jdistill.convert.dtypes import dtype_name
from jdistill.convert.staging import staging

WEIGHTS_NAME = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def _family(family) -> registry.Family:
    if isinstance(family, registry.Family):
        return family
    if isinstance(family, ModuleType):  # the converter module itself, jdistill.convert.<name>
        return registry.get(family.__name__.rpartition(".")[2])
    return registry.get(str(family))


def torch_state_shapes(family, config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every key of the PyTorch model ``config`` describes and its shape, from an instance built
    on the meta device (non-persistent buffers are not in a state dict, so not here either)."""
    import torch

    fam = _family(family)
    name = fam.torch_class_name(config)
    if fam.library == "diffusers":
        import diffusers

        cls = getattr(diffusers, name, None)
        build = lambda: cls.from_config(dict(config))  # noqa: E731
    else:
        import transformers

        cls = getattr(transformers, name, None)
        build = lambda: cls(cls.config_class.from_dict(dict(config)))  # noqa: E731
    if cls is None:
        raise registry.UnsupportedModel(f"{fam.library} has no class {name} to export to")
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def export_diffusers(family, module, params, config: Mapping, dst, *, dtype=None, overwrite: bool = False) -> Path:
    """Write ``params`` of ``module`` as a folder ``from_pretrained`` reads: ``config.json`` plus
    ``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors`` (transformers).

    ``family``: a family name (``"dit"``), :class:`registry.Family` or converter module;
    ``config``: the model's diffusers / transformers config (as converted, e.g.
    ``Pretrained.config``); ``dtype``: the stored dtype (default: the params'). The folder
    appears complete or not at all.
    """
    fam = _family(family)
    conv = fam.load()
    shapes = torch_state_shapes(fam, config)
    if getattr(module, "scan_blocks", False):  # stacked blocks -> the checkpoint's one entry per block
        params = module.per_block_params(params)
    state = engine.flax_to_torch_state_dict(params, shapes, conv.export_rules(module))
    if dtype is not None:
        target = np.dtype(jax.numpy.dtype(dtype_name(dtype)))
        state = {k: v.astype(target) for k, v in state.items()}
    config = dict(config)
    if fam.library == "diffusers":
        config.setdefault("_class_name", fam.torch_class_name(config))
    dst = Path(dst).expanduser().absolute()
    from safetensors.numpy import save_file

    with staging(dst, overwrite) as tmp:
        # "format": "pt" is what transformers / diffusers expect of a safetensors file they load
        save_file(state, os.fspath(tmp / WEIGHTS_NAME[fam.library]), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
