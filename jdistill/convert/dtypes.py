"""The dtypes converted params are stored in, by any of their names."""

from __future__ import annotations

import jax.numpy as jnp

from jdistill.errors import InvalidArgument

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def dtype_name(dtype) -> str:
    """``"bf16"`` / ``jnp.bfloat16`` / ``np.dtype`` -> ``"bfloat16"``."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise InvalidArgument(f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise InvalidArgument(f"params are stored as float32, bfloat16 or float16, not {name}")
    return name
