"""Accelerator peaks for MFU, and device memory, as JAX sees the device.

MFU = (XLA's FLOP count of the compiled step) / (step time) / (the device's dense bf16 peak).
The H200 figure is what a large bf16 matmul reaches on one H200 (measured); the others are the
vendors' dense bf16 numbers. CPUs have no entry: their MFU is left blank.
"""

from __future__ import annotations

import jax

# lower-case substring of jax's device_kind -> dense bf16 FLOP/s
PEAK_BF16 = (
    ("h200", 790e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),
    ("v6", 918e12),  # Trillium
    ("v4", 275e12),
)


def peak_flops(kind: str) -> float | None:
    kind = kind.lower()
    return next((peak for key, peak in PEAK_BF16 if key in kind), None)


def describe() -> dict:
    d = jax.devices()[0]
    return dict(platform=d.platform, kind=d.device_kind, count=jax.device_count(), peak_bf16=peak_flops(d.device_kind))


def peak_bytes() -> int | None:
    """The allocator's peak on device 0 since start (None where the backend keeps no statistics, as on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")
