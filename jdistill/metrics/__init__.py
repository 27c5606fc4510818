"""Metrics: Frechet distance, the shipped digits classifier (``digits_fd``), PSNR / SSIM.

Names are imported on first use, so that ``python -m jdistill.metrics.classifier``
does not import its own module twice and ``import jdistill.metrics`` stays cheap.
"""

import importlib

_EXPORTS = {
    "DigitsClassifier": "classifier",
    "digits_fd": "classifier",
    "load_digits_classifier": "classifier",
    "reference_stats": "classifier",
    "train_digits_classifier": "classifier",
    "FrechetError": "frechet",
    "frechet_distance": "frechet",
    "frechet_distance_from_stats": "frechet",
    "gaussian_stats": "frechet",
    "psnr": "image",
    "ssim": "image",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
