"""Frechet distance between Gaussians fitted to two feature sets (FID's formula).

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})

returned as d^2, the number FID reports. Computed in float64 on the host with
``scipy.linalg.sqrtm``, as the reference FID implementations do (pytorch-fid,
clean-fid): when the square root of ``S1 S2`` comes back non-finite or
inaccurate, ``eps * I`` is added to both covariances inside the square root
(only there, as in pytorch-fid) and it is retried; a complex result whose
imaginary part is not negligible is an error rather than silently dropped.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from jdistill.errors import UserError


class FrechetError(UserError, ValueError):
    """Features or statistics that give no meaningful Frechet distance."""


def gaussian_stats(features, *, min_samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, float64, with the unbiased (N - 1) covariance.

    ``min_samples`` defaults to D + 1, the fewest samples with which a
    covariance can be full rank; fewer (but at least 2) can be allowed
    explicitly, at the price of a biased distance.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise FrechetError(f"features must be (N, D), got shape {f.shape}")
    n, d = f.shape
    need = max(2, d + 1 if min_samples is None else int(min_samples))
    if n < need:
        raise FrechetError(f"{n} samples of {d}-d features: need at least {need} to fit a Gaussian"
                           + ("" if min_samples is not None else " (pass min_samples to allow fewer)"))
    if not np.isfinite(f).all():
        raise FrechetError(f"features contain {np.count_nonzero(~np.isfinite(f))} NaN / inf values")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise FrechetError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                           f"sigma {s1.shape} / {s2.shape}")
    for what, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise FrechetError(f"{what} contains NaN / inf")

    def sqrt_product(a, b):
        prod = a @ b
        root = scipy.linalg.sqrtm(prod)
        if not np.isfinite(root).all():
            return root, np.inf
        err = np.linalg.norm(root @ root - prod) / max(np.linalg.norm(prod), 1e-300)
        return root, err

    covmean, err = sqrt_product(s1, s2)
    if err > 1e-5:
        # S1 S2 (near-)singular: the Schur square root is then ill-conditioned.
        offset = np.eye(d) * eps
        covmean, err = sqrt_product(s1 + offset, s2 + offset)
        if not np.isfinite(covmean).all():
            raise FrechetError("sqrtm(sigma1 @ sigma2) is not finite even with an eps offset")
    if np.iscomplexobj(covmean):
        # S1 S2 is similar to a PSD matrix, so its root is real up to rounding.
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise FrechetError(f"sqrtm(sigma1 @ sigma2) has an imaginary part of {imag:.3g}: "
                               "the covariances are not positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    scale = diff @ diff + np.trace(s1) + np.trace(s2)
    if value < -1e-6 * max(scale, 1e-300):
        raise FrechetError(f"negative Frechet distance {value:.3g} (scale {scale:.3g}): "
                           "the square root is inaccurate")
    return float(max(value, 0.0))  # rounding of two equal Gaussians


def frechet_distance(features1, features2, *, min_samples: int | None = None, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to (N1, D) and (N2, D) feature sets."""
    mu1, s1 = gaussian_stats(features1, min_samples=min_samples)
    mu2, s2 = gaussian_stats(features2, min_samples=min_samples)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)
