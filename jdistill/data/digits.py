"""``digits``: scikit-learn's 1797 real 8x8 handwritten digits as a TFDS dataset.

The data is the UCI optical-recognition digits set that ships inside
scikit-learn (``sklearn.datasets.load_digits``): no download, values 0..16,
10 classes. The builder writes array_record files readable with
``builder.as_data_source()`` (random access, no TensorFlow).

Pixel rule: a value ``v`` in 0..16 becomes ``u = (255 * v + 8) // 16``, i.e.
``round(v * 255 / 16)`` with the one half (v = 8 -> 127.5) rounded up to 128,
so 0 -> 0, 16 -> 255, and ``v = round(u * 16 / 255)`` recovers the original
exactly.

Held-out split rule (stratified, fixed, independent of any RNG's version):
within each class, order the samples by the SHA-256 of
``"jdistill-digits-v1:<index>"`` (``index`` = the row of ``load_digits()``);
the first 30 of each class are ``test`` (300 samples, 30 per class), the rest
are ``train`` (1497).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from jdistill.data._tfds import BundledDataBuilder, png_bytes

NUM_CLASSES = 10
TEST_PER_CLASS = 30
SPLIT_SIZES = {"train": 1497, "test": 300}
_SPLIT_SALT = "jdistill-digits-v1"


def scale_to_uint8(values) -> np.ndarray:
    """0..16 integer-valued digits -> 0..255 uint8 by the module's rounding rule."""
    v = np.asarray(values)
    if not np.array_equal(v, np.round(v)) or v.min() < 0 or v.max() > 16:
        raise ValueError("digits values must be integers in 0..16")
    return ((255 * v.astype(np.int64) + 8) // 16).astype(np.uint8)


def _hash_key(index: int) -> str:
    return hashlib.sha256(f"{_SPLIT_SALT}:{index}".encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """{"train": rows, "test": rows} of ``load_digits()``, each sorted ascending."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    test = []
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(target == c)
        test.extend(sorted(rows.tolist(), key=_hash_key)[:TEST_PER_CLASS])
    test = np.sort(np.asarray(test, np.int64))
    train = np.setdiff1d(np.arange(len(target)), test)
    out = {"train": train, "test": test}
    for k, v in out.items():
        v.setflags(write=False)
        assert len(v) == SPLIT_SIZES[k], (k, len(v))
    return out


@functools.lru_cache(maxsize=2)
def _arrays(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    if split == "all":
        rows = np.arange(len(d.target))
    elif split in SPLIT_SIZES:
        rows = split_indices()[split]
    else:
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    images = scale_to_uint8(d.images[rows])[..., None]
    out = (images, d.target[rows].astype(np.int32), rows.astype(np.int32))
    for a in out:
        a.setflags(write=False)
    return out


def digits_arrays(split: str) -> dict[str, np.ndarray]:
    """The split as in-memory arrays, exactly what the TFDS builder writes, in row order.

    Returns {"image": (N, 8, 8, 1) uint8, "label": (N,) int32, "id": (N,) int32}
    (read-only). Used by the metrics so that they need no prepared dataset.
    """
    images, labels, ids = _arrays(split)
    return {"image": images, "label": labels, "id": ids}


class Digits(BundledDataBuilder):
    """scikit-learn's 8x8 handwritten digits with a fixed stratified held-out split."""

    # Prepared copies are keyed by version: bump it whenever a rule in the docstring changes.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "load_digits(), 0..16 -> 0..255, 300-sample stratified test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            # Records in the documented order (record i = row i of the *_arrays
            # helper); training pipelines shuffle anyway.
            disable_shuffling=True,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "id": tfds.features.Scalar(dtype=np.int32, doc="row of sklearn load_digits()"),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is inside scikit-learn
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split: str):
        arrays = digits_arrays(split)
        for image, label, idx in zip(arrays["image"], arrays["label"], arrays["id"]):
            yield int(idx), {"image": png_bytes(image), "label": int(label), "id": int(idx)}
