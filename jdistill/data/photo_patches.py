"""``photo_patches``: square crops of the real photographs bundled with scikit-image
and scikit-learn, as a TFDS dataset (array_record, no TensorFlow, no download).

For super-resolution / inpainting / image-to-image distillation at small
scale. Every crop is native resolution (no resizing); grey photographs are
repeated to 3 channels.

Rules (all fixed, documented here and checked by the tests):

* Photographs: :data:`PHOTOS`. Synthetic images (logo, colorwheel, phantom,
  checkerboard, binary blobs) are left out, and so is ``cat`` (the same
  picture as ``chelsea``).
* Split BY PHOTOGRAPH: the photographs in :data:`TEST_PHOTOS` (a colour
  portrait, a grey photograph, a colour still life and a texture) are
  ``test``; all others are ``train``. The two views of the stereo motorcycle
  pair are near-duplicates and are therefore both in ``train``.
* Crops: the non-overlapping ``P x P`` grid, centred in the photograph (the
  left-over border is split evenly, the extra pixel going to the bottom /
  right). Blank crops (standard deviation of the channel-mean image below
  1.0: the black surround of ``retina``) are dropped. So that one large
  photograph does not dominate, a photograph contributes at most one
  512x512 photograph's worth of crops (``512**2 // P**2``): when it has more,
  the crops kept are those whose SHA-256 of ``"<photo>:<row>:<col>"`` sorts
  first (a fixed choice that does not depend on any RNG's version).
* Crops are written photograph by photograph in raster order; each example
  carries the photograph's name and the crop's top-left (row, col).

Most photographs are PNGs and decode bit-exactly everywhere; hubble_deep_field,
retina, rocket, china and flower are JPEGs, whose pixels are those of the
installed decoder (Pillow's libjpeg-turbo).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from jdistill.data._tfds import BundledDataBuilder, png_bytes

#: Every photograph used, with where it comes from.
PHOTOS: dict[str, str] = {
    "astronaut": "skimage.data.astronaut",
    "camera": "skimage.data.camera",
    "coffee": "skimage.data.coffee",
    "gravel": "skimage.data.gravel",
    "chelsea": "skimage.data.chelsea",
    "rocket": "skimage.data.rocket",
    "motorcycle_left": "skimage.data.stereo_motorcycle()[0]",
    "motorcycle_right": "skimage.data.stereo_motorcycle()[1]",
    "brick": "skimage.data.brick",
    "grass": "skimage.data.grass",
    "coins": "skimage.data.coins",
    "hubble_deep_field": "skimage.data.hubble_deep_field",
    "retina": "skimage.data.retina",
    "immunohistochemistry": "skimage.data.immunohistochemistry",
    "moon": "skimage.data.moon",
    "page": "skimage.data.page",
    "text": "skimage.data.text",
    "clock": "skimage.data.clock",
    "cell": "skimage.data.cell",
    "china": "sklearn.datasets.load_sample_images() china.jpg",
    "flower": "sklearn.datasets.load_sample_images() flower.jpg",
}
TEST_PHOTOS: tuple[str, ...] = ("astronaut", "camera", "coffee", "gravel")
TRAIN_PHOTOS: tuple[str, ...] = tuple(p for p in PHOTOS if p not in TEST_PHOTOS)
PATCH_SIZES = (32, 64)
#: Examples per split for each patch size (what the rules below give; checked by the tests).
SPLIT_SIZES = {32: {"train": 3525, "test": 973}, 64: {"train": 858, "test": 246}}
BLANK_STD = 1.0
_MAX_AREA = 512 * 512


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """The photograph ``name`` as read-only uint8 (H, W, 3)."""
    if name not in PHOTOS:
        raise KeyError(f"unknown photograph {name!r}; known: {sorted(PHOTOS)}")
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        (img,) = [im for im, f in zip(sample.images, sample.filenames) if f.endswith(f"{name}.jpg")]
    else:
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"photograph {name} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3])
    img.setflags(write=False)
    return img


def _hash_key(name: str, pos: tuple[int, int]) -> str:
    return hashlib.sha256(f"{name}:{pos[0]}:{pos[1]}".encode()).hexdigest()


def crop_positions(name: str, patch_size: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of the crops of photograph ``name`` kept by the module's rules."""
    img = load_photo(name)
    h, w = img.shape[:2]
    p = patch_size
    nh, nw = h // p, w // p
    oy, ox = (h - nh * p) // 2, (w - nw * p) // 2
    grey = img.astype(np.float64).mean(-1)
    pos = [(oy + i * p, ox + j * p) for i in range(nh) for j in range(nw)]
    pos = [(y, x) for y, x in pos if grey[y:y + p, x:x + p].std() >= BLANK_STD]
    cap = _MAX_AREA // (p * p)
    if len(pos) > cap:
        keep = set(sorted(pos, key=lambda q: _hash_key(name, q))[:cap])
        pos = [q for q in pos if q in keep]  # back to raster order
    return pos


def photo_patches_arrays(split: str, patch_size: int) -> dict[str, np.ndarray]:
    """The split as in-memory arrays, in the builder's order.

    {"image": (N, P, P, 3) uint8, "photo": (N,) str, "position": (N, 2) int32}.
    """
    photos = TEST_PHOTOS if split == "test" else TRAIN_PHOTOS if split == "train" else None
    if photos is None:
        raise ValueError(f"photo_patches split must be 'train' or 'test', got {split!r}")
    images, names, positions = [], [], []
    for name in photos:
        img = load_photo(name)
        for y, x in crop_positions(name, patch_size):
            images.append(img[y:y + patch_size, x:x + patch_size])
            names.append(name)
            positions.append((y, x))
    return {"image": np.stack(images), "photo": np.asarray(names),
            "position": np.asarray(positions, np.int32)}


@dataclasses.dataclass
class PhotoPatchesConfig(tfds.core.BuilderConfig):
    patch_size: int = 32


class PhotoPatches(BundledDataBuilder):
    """Crops of real bundled photographs, split by photograph (see the module docstring)."""

    # Prepared copies are keyed by version: bump it whenever a rule in the docstring changes.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Centred non-overlapping grid, blank crops dropped, capped per photo."}
    BUILDER_CONFIGS = [
        PhotoPatchesConfig(name=str(p), patch_size=p, description=f"{p}x{p} RGB crops")
        for p in PATCH_SIZES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        p = self.builder_config.patch_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            # Records in the documented order (record i = row i of the *_arrays
            # helper); training pipelines shuffle anyway.
            disable_shuffling=True,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(p, p, 3), dtype=np.uint8),
                "photo": tfds.features.Text(doc="name of the source photograph"),
                "position": tfds.features.Tensor(shape=(2,), dtype=np.int32,
                                                 doc="top-left (row, col) in the photograph"),
            }),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the photographs ship inside scikit-image / scikit-learn
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        p = self.builder_config.patch_size
        arrays = photo_patches_arrays(split, p)
        for image, name, (y, x) in zip(arrays["image"], arrays["photo"], arrays["position"]):
            yield f"{name}:{y}:{x}", {"image": png_bytes(image), "photo": str(name),
                                      "position": np.array([y, x], np.int32)}
