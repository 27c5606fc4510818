"""diffusers ``UNet2DModel`` checkpoints -> :class:`jdistill.models.unet2d.UNet2DModel` params.

The Flax modules carry diffusers' attribute names, so the engine's generic rule
maps every key of a checkpoint written by ``save_pretrained``. The only rules
are for the attention keys of checkpoints written before diffusers renamed
them (``query`` / ``key`` / ``value`` / ``proj_attn``, as in the original DDPM
and SD-VAE uploads), which diffusers itself renames on load
(``ModelMixin._fix_state_dict_keys_on_load``). The VAE and the conditional
UNet reuse :data:`DEPRECATED_ATTENTION_RULES`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jdistill.errors import InvalidArgument
from jdistill.convert import engine
from jdistill.models import layers
from jdistill.models.unet2d import UNet2DModel, config_from_diffusers

# "<...>.attentions.N.query.weight" -> "<...>.attentions.N.to_q.weight"; a key that already
# holds the new names passes through untouched.
DEPRECATED_ATTENTION_RULES = [
    engine.rename(rf"(^|\.)(attentions\.\d+)\.{old}\.", rf"\1\2.{new}.")
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
]

UNET2D_RULES = list(DEPRECATED_ATTENTION_RULES)


def load_unet2d_params(state_dict: Mapping, module, *, rng: jax.Array | None = None, dtype=None):
    """Flax params for ``module`` (a ``UNet2DModel``) from a diffusers state dict (a dict of
    tensors / arrays, or any lazy mapping of them).

    The target tree is ``jax.eval_shape`` of ``module.init``: nothing is randomly
    initialised, and every missing, unexpected or mis-shaped key is named in a
    :class:`engine.ConversionError`.

    A ``guidance_embed=True`` module is a student made from a teacher checkpoint, which has
    no guidance embedding: that one module is initialised from ``rng`` (its zero-initialised
    last layer keeps the student equal to the teacher until it trains).
    """
    target = dict(engine.abstract_params(module, **module.dummy_inputs()))
    guidance_target = target.pop("guidance_embedder", None)
    params, _ = engine.convert_state_dict(state_dict, target, UNET2D_RULES, what="UNet2DModel checkpoint",
                                          dtype=dtype)
    if guidance_target is not None:
        if rng is None:
            raise InvalidArgument("a guidance_embed=True UNet2DModel needs `rng` to initialise its guidance embedding "
                             "(a diffusers checkpoint has none)")
        embed = layers.GuidanceEmbedding(module.time_embed_dim, dtype=module.dtype, param_dtype=module.param_dtype)
        params = engine.add_fresh_submodule(params, "guidance_embedder", embed, guidance_target, rng,
                                            jnp.zeros((1,), jnp.float32), dtype=dtype)
    return params


# --- the family protocol the converter registry calls by name -----------------------------

def module_from_config(config: Mapping, dtype=jnp.float32, param_dtype=jnp.float32):
    """The Flax ``UNet2DModel`` for a diffusers config.json dict (unsupported options raise)."""
    return UNet2DModel(**config_from_diffusers(config), dtype=dtype, param_dtype=param_dtype)


def load_params(state_dict: Mapping, module, **kwargs):
    """:func:`load_unet2d_params` (``rng`` / ``dtype`` pass through)."""
    return load_unet2d_params(state_dict, module, **kwargs)


def export_rules(module) -> list:
    """Params -> diffusers keys (the current names) needs nothing beyond the generic rule."""
    return []


def example_inputs(module, batch: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``module.init``: the module's ``dummy_inputs`` as keywords."""
    return (), module.dummy_inputs(batch)
