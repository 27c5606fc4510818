"""Helpers for comparing jdistill against PyTorch references (used by tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the error at the scale of the whole tensor."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != {expected.shape}")
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def assert_close(actual, expected, rtol: float, what: str = "") -> float:
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"
    return err


def nchw(x):
    """NHWC (JAX) -> NCHW (PyTorch)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))


def nhwc(x):
    """NCHW (PyTorch) -> NHWC (JAX)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))
