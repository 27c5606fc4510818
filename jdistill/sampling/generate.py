"""Many samples in fixed-size batches, timed fairly (compilation excluded)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from jdistill.errors import InvalidArgument, NonFiniteOutput, check_positive_int, check_seed


def generate(sample_fn: Callable, image_shape, labels: np.ndarray | None, *, num: int | None = None,
             batch_size: int = 500, seed: int = 0, progress: bool = False, repeats: int = 1,
             conditions: dict | None = None):
    """Run ``sample_fn(noise, cond, key) -> images`` over ``num`` samples (default: len(labels)).

    ``cond`` holds each batch's rows of ``labels`` (as ``class_labels``) and of every array in
    ``conditions`` (per-sample conditions, e.g. the condition images of a conditional model).

    Batch b draws its noise and sampler key from ``fold_in(key(seed), b)``, so a
    sample depends only on (seed, its index), not on how many are drawn. The
    first batch is run once before timing so compilation is not counted; with
    ``repeats`` > 1 the whole set is drawn that many times and the fastest time
    kept (the usual guard against a busy machine; the images are the same each time).
    Returns (images float32 [-1, 1] (N, H, W, C), seconds for all N).
    """
    num = (len(labels) if labels is not None else len(next(iter(conditions.values())))) if num is None else num
    num = check_positive_int("num (samples)", num)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    if labels is not None and len(labels) < num:
        raise InvalidArgument(f"{len(labels)} labels for {num} samples")
    root = jax.random.key(seed)

    def batch(b):
        k_noise, k_sample = jax.random.split(jax.random.fold_in(root, b))
        rows = slice(b * batch_size, min((b + 1) * batch_size, num))
        n = rows.stop - rows.start
        noise = jax.random.normal(k_noise, (batch_size, *image_shape))
        cond = None if labels is None else {"class_labels": np.resize(labels[rows], batch_size).astype(np.int32)}
        if conditions:
            cond = dict(cond or {}, **{k: _rows(v, rows, batch_size) for k, v in conditions.items()})
        return sample_fn(noise, cond, k_sample), n

    jax.block_until_ready(batch(0)[0])  # compile outside the timed region
    nb = -(-num // batch_size)
    best = float("inf")
    for _ in range(max(1, repeats)):
        out, start = [], time.perf_counter()
        it = range(nb)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="sampling", leave=False)
        for b in it:
            images, n = batch(b)
            images = np.asarray(jax.device_get(images))[:n]
            # NaN would become black (or saturated) pixels in a uint8 file: refuse instead
            if not np.isfinite(images).all():
                raise NonFiniteOutput(f"the model gave non-finite samples (NaN / inf) in batch {b}; its params are "
                                      "not usable (trained with too high a learning rate?). Nothing was written")
            out.append(images)
        best = min(best, time.perf_counter() - start)
    return np.concatenate(out, axis=0), best


def _rows(values, rows: slice, batch_size: int) -> np.ndarray:
    """Rows ``rows`` of a per-sample array, padded to a full batch by repeating them (as labels are)."""
    part = np.asarray(values[rows])
    return part[np.resize(np.arange(len(part)), batch_size)]
