"""Image helpers: [-1, 1] floats <-> uint8, grids and PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 (round half to even, clipped)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(x) -> np.ndarray:
    """uint8 -> [-1, 1] float32."""
    return np.asarray(x, np.float32) / 127.5 - 1.0


def grid(images, ncol: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) uint8 mosaic with ``pad``-pixel gutters."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    if upscale > 1:
        images = images.repeat(upscale, 1).repeat(upscale, 2)
        h, w = h * upscale, w * upscale
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return out


def save_png(path, image) -> str:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_grid(path, images, ncol=None, upscale: int | None = None) -> str:
    images = np.asarray(images)
    if upscale is None:  # tiny images (8x8 digits) get enlarged so a person can see them
        upscale = max(1, 64 // images.shape[1])
    return save_png(path, grid(images, ncol, upscale=upscale))
