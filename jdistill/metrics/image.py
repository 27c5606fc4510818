"""PSNR and SSIM in JAX, matching scikit-image.

``ssim`` equals ``skimage.metrics.structural_similarity(a, b, data_range=R,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=-1)`` (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
K1 = 0.01, K2 = 0.03, population covariances, the mean over channels of the
mean SSIM map). scikit-image filters with ``mode="reflect"`` and then drops a
5-pixel border; every value it keeps lies wholly inside the image, so a
"valid" separable filter gives the same map with no padding at all.

``psnr`` equals ``skimage.metrics.peak_signal_noise_ratio(a, b, data_range=R)``
(``inf`` for identical images).

Both take (..., H, W, C) arrays (any leading batch dims) and return one value
per image; they are jittable. uint8 images default to ``data_range=255``;
float images need it given (2.0 for jdistill's [-1, 1] images), as in
scikit-image.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _data_range(x, y, data_range):
    if data_range is not None:
        return data_range
    if jnp.dtype(x.dtype) == jnp.uint8 and jnp.dtype(y.dtype) == jnp.uint8:
        return 255.0
    raise ValueError(f"data_range must be given for {x.dtype} / {y.dtype} images "
                     "(255 for 0..255, 2.0 for [-1, 1], 1.0 for [0, 1])")


def _check(x, y):
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if x.ndim < 3:
        raise ValueError(f"images must be (..., H, W, C), got shape {x.shape}")


def psnr(a, b, *, data_range: float | None = None):
    """Peak signal-to-noise ratio in dB per image of (..., H, W, C) arrays."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check(a, b)
    r = _data_range(a, b, data_range)
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(-3, -2, -1))
    return 10.0 * jnp.log10(jnp.float32(r) ** 2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """scipy.ndimage's normalised 1-d Gaussian taps (radius ``int(truncate * sigma + 0.5)``: 11 taps)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x, w: np.ndarray):
    """Separable 'valid' filtering of (..., H, W, C) over H and W: a fixed sum of shifted slices,
    exact fp32 multiply-adds on every backend (no convolution precision modes)."""
    k = len(w)
    h, wd = x.shape[-3], x.shape[-2]
    x = sum(float(w[i]) * x[..., i:h - k + 1 + i, :, :] for i in range(k))
    return sum(float(w[i]) * x[..., :, i:wd - k + 1 + i, :] for i in range(k))


def ssim(a, b, *, data_range: float | None = None, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Mean structural similarity per image of (..., H, W, C) arrays (mean over channels)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check(a, b)
    r = _data_range(a, b, data_range)
    w = gaussian_window(sigma)
    if min(a.shape[-3], a.shape[-2]) < len(w):
        raise ValueError(f"SSIM's {len(w)}x{len(w)} window needs images of at least that size, "
                         f"got H, W = {a.shape[-3]}, {a.shape[-2]}")
    x, y = a.astype(jnp.float32), b.astype(jnp.float32)
    # Local variances are E[x^2] - E[x]^2; in fp32 that difference loses the
    # digits shared by both terms. Taking it about each image's channel mean
    # (the filter is linear with unit-sum weights, so the variances are the
    # same quantities) leaves only the local deviations to cancel.
    mx = jnp.mean(x, axis=(-3, -2), keepdims=True)
    my = jnp.mean(y, axis=(-3, -2), keepdims=True)
    xc, yc = x - mx, y - my
    ux_c, uy_c = _filter_valid(xc, w), _filter_valid(yc, w)
    vx = _filter_valid(xc * xc, w) - ux_c * ux_c
    vy = _filter_valid(yc * yc, w) - uy_c * uy_c
    vxy = _filter_valid(xc * yc, w) - ux_c * uy_c
    ux, uy = ux_c + mx, uy_c + my
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(-3, -2, -1))
