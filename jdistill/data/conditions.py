"""Conditional tasks as data: a condition image derived from each example of an existing dataset.

    spec = parse("sr2")                              # 2x super-resolution; "sr4", "inpaint", "edges"
    raw = degrade(spec, images, rng)                 # what a user would hold: the low-res image, ...
    cond = model_input(spec, raw, images.shape[1:])  # what the adapter reads, at the model's size
    source = ConditionalSource(batch_source, spec, seed)   # batches gain a "condition"

Kinds (no new files: everything is computed from the images):

* ``srF`` (F = 2, 4, ...): the image averaged over F x F blocks (area downsampling, what an F
  times smaller camera sees); the model reads it upsampled back (nearest), C channels;
* ``inpaint``: one random half of the image (top, bottom, left or right) masked; the model reads
  the masked image (masked pixels 0, mid-grey) and the mask (1 where masked, as -1 / 1): C + 1;
* ``edges``: Canny edges (``skimage.feature.canny``, sigma 1) of the grey image, as -1 / 1: 1.

Images are float (N, H, W, C) in [-1, 1], as batches carry them. Random choices (the inpainting
half) come from the generator given; :class:`ConditionalSource` seeds it with (seed, step), so a
batch's conditions, like its rows, are a function of the step alone (exact resume).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jdistill.errors import InvalidArgument

KINDS = ("sr", "inpaint", "edges")


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    kind: str
    factor: int = 1  # super-resolution factor

    @property
    def name(self) -> str:
        return f"sr{self.factor}" if self.kind == "sr" else self.kind

    def channels(self, image_channels: int) -> int:
        """Channels of the model-side condition."""
        return {"sr": image_channels, "inpaint": image_channels + 1, "edges": 1}[self.kind]


def parse(name: str) -> ConditionSpec:
    m = re.fullmatch(r"sr(\d+)", str(name))
    if m:
        factor = int(m.group(1))
        if factor < 2:
            raise InvalidArgument(f"condition {name!r}: a super-resolution factor is at least 2")
        return ConditionSpec("sr", factor)
    if name in ("inpaint", "edges"):
        return ConditionSpec(name)
    raise InvalidArgument(f"unknown condition {name!r}; expected srF (sr2, sr4, ...), inpaint or edges")


def downsample(images, factor: int) -> np.ndarray:
    """Area downsampling: the mean over factor x factor blocks."""
    n, h, w, c = images.shape
    if h % factor or w % factor:
        raise InvalidArgument(f"images of {h}x{w} do not divide into {factor}x{factor} blocks")
    return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4)).astype(np.float32)


def half_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w, 1) float masks, 1 on one random half per image (top, bottom, left, right)."""
    which = rng.integers(0, 4, n)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    halves = np.stack([np.broadcast_to(rows < h // 2, (h, w)), np.broadcast_to(rows >= h - h // 2, (h, w)),
                       np.broadcast_to(cols < w // 2, (h, w)), np.broadcast_to(cols >= w - w // 2, (h, w))])
    return halves[which][..., None].astype(np.float32)


def canny_edges(images, sigma: float = 1.0) -> np.ndarray:
    """(n, h, w, 1) Canny edges (1 / 0) of the grey images."""
    from skimage.feature import canny

    grey = (np.asarray(images, np.float64).mean(-1) + 1.0) / 2.0
    return np.stack([canny(g, sigma=sigma) for g in grey])[..., None].astype(np.float32)


def degrade(spec: ConditionSpec, images, rng: np.random.Generator | None = None) -> dict:
    """The raw condition of each image: {"low_res"} / {"masked", "mask"} / {"edges"}."""
    images = np.asarray(images, np.float32)
    if spec.kind == "sr":
        return {"low_res": downsample(images, spec.factor)}
    if spec.kind == "inpaint":
        if rng is None:
            raise ValueError("inpainting masks need a random generator")
        mask = half_masks(rng, *images.shape[:3])
        return {"masked": images * (1.0 - mask), "mask": mask}
    return {"edges": canny_edges(images)}


def model_input(spec: ConditionSpec, raw: dict, image_shape) -> np.ndarray:
    """The adapter's input (N, H, W, channels) in [-1, 1] from a raw condition."""
    h, w = int(image_shape[0]), int(image_shape[1])
    if spec.kind == "sr":
        low = np.asarray(raw["low_res"], np.float32)
        if low.shape[1:3] != (h // spec.factor, w // spec.factor):
            raise InvalidArgument(f"a {spec.name} condition is {h // spec.factor}x{w // spec.factor}, got "
                                  f"{low.shape[1]}x{low.shape[2]}")
        return np.repeat(np.repeat(low, spec.factor, axis=1), spec.factor, axis=2)
    if spec.kind == "inpaint":
        mask = np.asarray(raw["mask"], np.float32)
        return np.concatenate([np.asarray(raw["masked"], np.float32), 2.0 * mask - 1.0], axis=-1)
    return 2.0 * np.asarray(raw["edges"], np.float32) - 1.0


def make(spec: ConditionSpec, images, rng: np.random.Generator | None = None) -> np.ndarray:
    """The model-side condition of ``images`` (degrade, then model_input)."""
    images = np.asarray(images, np.float32)
    return model_input(spec, degrade(spec, images, rng), images.shape[1:])


def evaluation_set(spec: ConditionSpec, images, seed: int = 0) -> np.ndarray:
    """Fixed conditions of an evaluation split (the inpainting halves drawn once from ``seed``)."""
    return make(spec, images, np.random.default_rng([int(seed), 0xC0D1]))


def _as_float(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)


def read_condition_file(path: str, spec: ConditionSpec, image_shape) -> np.ndarray:
    """The conditions in a ``.npz`` for ``jdistill sample --condition``: ``condition`` holding either the
    model-side array (N, H, W, channels) or, for super-resolution, the low-resolution images
    (N, H / F, W / F, C); uint8 (0..255) or float in [-1, 1]. Masks: an inpainting file's last
    channel (-1 / 1) or a separate ``mask`` array (0 / 1) with ``condition`` the masked image."""
    import os

    if not os.path.isfile(path):
        from jdistill.errors import MissingInput

        raise MissingInput(f"no condition file at {path}")
    with np.load(path) as f:
        if "condition" not in f:
            raise InvalidArgument(f"{path} has no 'condition' array (it has {sorted(f.files)})")
        cond = _as_float(f["condition"])
        mask = np.asarray(f["mask"], np.float32) if "mask" in f else None
    h, w, c = (int(d) for d in image_shape)
    if cond.ndim == 3:
        cond = cond[..., None]
    if cond.ndim != 4:
        raise InvalidArgument(f"{path}: 'condition' must be (N, H, W, C), got {cond.shape}")
    if spec.kind == "sr" and cond.shape[1:3] == (h // spec.factor, w // spec.factor):
        cond = model_input(spec, {"low_res": cond}, image_shape)
    elif spec.kind == "inpaint" and mask is not None:
        cond = model_input(spec, {"masked": cond, "mask": mask.reshape(cond.shape[:3] + (1,))}, image_shape)
    want = (h, w, spec.channels(c))
    if tuple(cond.shape[1:]) != want:
        raise InvalidArgument(f"{path}: a {spec.name} model reads conditions of shape {want}, got "
                              f"{tuple(cond.shape[1:])}")
    return cond


class ConditionalSource:
    """A BatchSource whose batches also carry ``condition`` (the model-side condition of ``image``)."""

    def __init__(self, source, spec: ConditionSpec, seed: int):
        self.source, self.spec, self.seed = source, spec, int(seed)
        self.image_shape = source.image_shape

    def _with_condition(self, batch: dict, step: int) -> dict:
        rng = np.random.default_rng([self.seed, int(step), int(self.source.process_index), 0xC0D1])
        return {**batch, "condition": make(self.spec, batch["image"], rng)}

    def __getitem__(self, step: int) -> dict:
        return self._with_condition(self.source[step], step)

    def iterate(self, start_step: int = 0, num_steps: int | None = None, *, mesh=None, **kw):
        import itertools

        steps = itertools.count(start_step)
        local = (self._with_condition(b, k) for k, b in zip(steps, self.source.iterate(start_step, num_steps, **kw)))
        if mesh is None:
            return local
        from jdistill.train.mesh import global_batch

        return (global_batch(b, mesh) for b in local)

    def __getattr__(self, name):
        return getattr(self.source, name)
