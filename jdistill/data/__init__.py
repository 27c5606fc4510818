"""Data: TFDS builders over data bundled in scikit-learn / scikit-image (array_record, no
TensorFlow) and the grain pipeline that batches, shards over processes and resumes exactly.

- ``digits``: :mod:`jdistill.data.digits` (1797 real 8x8 digits, fixed 1497 / 300 split)
- ``photo_patches/32``, ``photo_patches/64``: :mod:`jdistill.data.photo_patches`
- :func:`load_builder`, :func:`make_batch_source`, :class:`BatchSource`: :mod:`jdistill.data.pipeline`
"""

from jdistill.data.digits import Digits, digits_arrays
from jdistill.data.photo_patches import PhotoPatches, photo_patches_arrays
from jdistill.data.pipeline import (
    BatchSource,
    DatasetNotAvailableError,
    ImageShapeError,
    check_image_shape,
    default_data_dir,
    load_builder,
    make_batch_source,
)

__all__ = [
    "BatchSource", "DatasetNotAvailableError", "Digits", "ImageShapeError", "PhotoPatches",
    "check_image_shape", "default_data_dir", "digits_arrays", "load_builder", "make_batch_source",
    "photo_patches_arrays",
]
