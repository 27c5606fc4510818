"""What jdistill's own TFDS builders share: building without TensorFlow or a download."""

from __future__ import annotations

import inspect
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image


class BundledDataBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder over data that ships inside an installed package.

    Written as array_record by default: TFDS's default, tfrecord, needs
    TensorFlow to write and to read, while array_record files are read by
    ``builder.as_data_source()`` (random access, what grain consumes).
    """

    def __init__(self, *, file_format: str | None = None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    # TFDS locates a builder's source through ``importlib_resources`` (a
    # back-port it only requires on Python < 3.9) when the builder lives in a
    # package, and download_and_prepare() needs that path for its (empty here)
    # URL checksums. The file of the class is the same answer without the
    # back-port.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes.

    TFDS encodes numpy images with ``tf.image.encode_png``, which needs
    TensorFlow; PIL's PNG is lossless, and TFDS decodes it (``as_data_source``)
    with PIL when TensorFlow is absent.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="png")
    return buf.getvalue()
