"""TFDS builders -> grain batches, sharded over processes, with exact resume.

The stream of examples is the concatenation of per-epoch permutations of the
split (epoch ``e`` is shuffled with a seed derived from ``(seed, e)``), and
global batch ``k`` is rows ``[k * B, (k + 1) * B)`` of that stream. Every batch
is therefore a pure function of ``(seed, k)``: the data position of a run *is*
its training step, so resuming at step ``k`` (checkpoint the step, nothing
else) gives exactly the batches an uninterrupted run would have seen. Batches
straddle epoch boundaries; nothing is dropped, and each epoch shows every
example exactly once.

Process ``i`` of ``P`` reads only rows ``[i * B / P, (i + 1) * B / P)`` of each
global batch; :func:`jdistill.train.mesh.global_batch` (or
``iterate(..., mesh=mesh)``) assembles the slices into global arrays split
over the mesh.

Batches are ``{"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,)}``
(``label`` when the dataset has one), ``u8 / 127.5 - 1`` for uint8 images.

Orders depend on grain's ``index_shuffle``: exact resume holds for a fixed
grain version (0.2.18 here), which is what a run pins.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from jdistill.errors import UserError

# Importing the builders registers them with TFDS under their names.
from jdistill.data.digits import Digits
from jdistill.data.photo_patches import PhotoPatches

#: jdistill's own builders: prepared locally on first use (the data ships inside packages).
LOCAL_BUILDERS: dict[str, type] = {"digits": Digits, "photo_patches": PhotoPatches}


#: splits that decode to at most this many bytes are held in memory (see BatchSource)
IN_MEMORY_BYTES = 256 * 2**20


class DatasetNotAvailableError(UserError, FileNotFoundError):
    """A dataset is unknown, not prepared under the data dir, or not readable without TensorFlow."""


class ImageShapeError(UserError, ValueError):
    """A dataset's images do not have the shape a model was configured for."""


def default_data_dir() -> str:
    """``$JDISTILL_DATA``, else ``~/.cache/jdistill/tensorflow_datasets``."""
    return os.path.expanduser(os.environ.get("JDISTILL_DATA") or "~/.cache/jdistill/tensorflow_datasets")


def _base_name(name: str) -> str:
    return name.split("/", 1)[0].split(":", 1)[0]


@contextlib.contextmanager
def _file_lock(path: str):
    # Several processes of one job (or several jobs) may start on a cold data
    # dir at once; one builds, the others wait and then find it prepared.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_builder(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """A prepared TFDS builder for ``name`` (e.g. ``"digits"``, ``"photo_patches/64"``, ``"cifar10"``).

    jdistill's own builders (:data:`LOCAL_BUILDERS`) are prepared into
    ``data_dir`` on first use. Any other TFDS dataset is read when its
    array_record files are already there; otherwise a
    :class:`DatasetNotAvailableError` names the dataset and the directory
    searched. Nothing is ever downloaded.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    base = _base_name(name)
    if re.match(r"^[\w\-]+:[A-Za-z_]", name):
        # "namespace:dataset" resolves through community registries (Hugging
        # Face, Kaggle...), i.e. over the network.
        raise DatasetNotAvailableError(
            f"dataset {name!r} is a community (namespaced) TFDS dataset; jdistill reads only "
            f"datasets prepared under {data_dir!r} and never downloads")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotAvailableError(
            f"unknown dataset {name!r}: neither a jdistill builder ({', '.join(sorted(LOCAL_BUILDERS))}) "
            f"nor a TFDS dataset registered or prepared under {data_dir!r}") from e

    if base in LOCAL_BUILDERS:
        if not builder.is_prepared():
            lock = os.path.join(data_dir, f".{name.replace('/', '_').replace(':', '_')}.lock")
            with _file_lock(lock):
                builder = tfds.builder(name, data_dir=data_dir)
                if not builder.is_prepared():
                    builder.download_and_prepare()
        return builder

    if not builder.is_prepared():
        raise DatasetNotAvailableError(
            f"dataset {name!r} is not prepared: searched {os.fspath(builder.data_path)!r} "
            f"(data dir {data_dir!r}). jdistill never downloads. Prepare it where the network "
            f"(or, for imagenet2012, the manual dir) is available, e.g. `tfds build {base} "
            f"--file_format=array_record --data_dir=DIR`, then copy DIR here or point "
            f"$JDISTILL_DATA / data_dir at it")
    fmt = builder.info.file_format
    if fmt is not None and fmt != tfds.core.FileFormat.ARRAY_RECORD:
        raise DatasetNotAvailableError(
            f"dataset {name!r} under {os.fspath(builder.data_path)!r} is stored as {fmt.value}; "
            f"random access without TensorFlow needs array_record (rebuild with "
            f"--file_format=array_record, or `tfds convert_format --out_file_format=array_record`)")
    return builder


def _shuffle_seed(seed: int) -> int:
    # grain reseeds epoch e with (seed + e): hashing the user's seed first keeps
    # runs with seeds s and s + 1 from replaying each other's epochs shifted by one.
    return int(np.random.SeedSequence([int(seed), 0x6A64]).generate_state(1, np.uint32)[0])


def _feature_spec(features) -> tuple[tuple[int, ...] | None, bool]:
    image = features["image"] if "image" in features else None
    shape = tuple(image.shape) if image is not None else None
    return shape, "label" in features


def _to_model(batch: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for k in keys:
        v = np.asarray(batch[k])
        if k == "image":
            v = v.astype(np.float32) / 127.5 - 1.0 if v.dtype == np.uint8 else v.astype(np.float32)
        elif k == "label":
            v = v.astype(np.int32)
        out[k] = v
    return out


class BatchSource:
    """Random access to the batches of one split: ``source[k]`` is this process's rows of global batch k.

    Args:
      source: a random-access sequence of example dicts (``builder.as_data_source(split)``).
      global_batch_size: rows per global batch ``B`` (over all processes).
      seed: the shuffling seed.
      image_shape: (H, W, C) of the images the batches carry (must be one fixed size).
      keys: which features a batch carries (default ``("image", "label")`` where present).
      process_index, process_count: this process's slot (default: JAX's).
      record_transform: an optional deterministic ``dict -> dict`` applied to each
        example before batching (e.g. a fixed crop of variable-size images); it must
        not draw random numbers, or exact resume is lost.
      name: used in error messages.
      in_memory: decode the whole split once and cut batches out of arrays (same rows,
        same order as streaming). ``None`` decides by size: splits that decode to at
        most ``IN_MEMORY_BYTES`` are held in memory, since per-example decoding costs
        more than a train step of a small model.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], *, global_batch_size: int, seed: int,
                 image_shape: Sequence[int] | None, keys: Sequence[str] = ("image", "label"),
                 process_index: int | None = None, process_count: int | None = None,
                 record_transform: Callable[[dict], dict] | None = None, name: str = "dataset",
                 in_memory: bool | None = None):
        self.name = name
        self.num_examples = len(source)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if self.num_examples == 0:
            raise ValueError(f"{name}: the split is empty")
        if self.global_batch_size <= 0 or self.global_batch_size % self.process_count:
            raise ValueError(f"{name}: global batch size {self.global_batch_size} must be a positive "
                             f"multiple of the process count {self.process_count}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process index {self.process_index} not in [0, {self.process_count})")
        if image_shape is not None and (len(image_shape) != 3 or any(d is None for d in image_shape)):
            raise ImageShapeError(
                f"{name}: images of shape {tuple(image_shape)} are not of one fixed (H, W, C) size; "
                f"pass a record_transform that crops / resizes them and image_shape=(H, W, C)")
        self.image_shape = tuple(int(d) for d in image_shape) if image_shape is not None else None
        self.keys = tuple(keys)
        self.local_batch_size = self.global_batch_size // self.process_count

        stream = grain.MapDataset.source(source)
        if record_transform is not None:
            stream = stream.map(record_transform)
        # shuffle-then-repeat: grain reshuffles each epoch (epoch = index // len).
        stream = stream.shuffle(seed=_shuffle_seed(self.seed)).repeat(None)
        keys_ = self.keys
        # Local batch j of this process = stream rows [j b, (j + 1) b) taken at
        # j = k P + i: rows [k B + i b, k B + (i + 1) b) of global batch k.
        self._batches = (stream.batch(self.local_batch_size, drop_remainder=True)
                         [self.process_index::self.process_count]
                         .map(lambda batch: _to_model(batch, keys_)))
        self._indices = grain.MapDataset.range(self.num_examples).shuffle(
            seed=_shuffle_seed(self.seed)).repeat(None)
        self._arrays = None
        if in_memory is None:
            first = stream[0] if record_transform is None else record_transform(source[0])
            in_memory = self.num_examples * sum(np.asarray(first[k]).nbytes for k in self.keys) <= IN_MEMORY_BYTES
        if in_memory:
            plain = grain.MapDataset.source(source)
            if record_transform is not None:
                plain = plain.map(record_transform)
            records = [plain[i] for i in range(self.num_examples)]
            self._arrays = {k: np.stack([np.asarray(r[k]) for r in records]) for k in self.keys}

    @property
    def in_memory(self) -> bool:
        return self._arrays is not None

    # -- positions -------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the split (fractional: batches straddle epochs)."""
        return self.num_examples / self.global_batch_size

    def epoch_of_step(self, step: int) -> int:
        """The epoch in which global batch ``step`` starts."""
        return (step * self.global_batch_size) // self.num_examples

    def global_indices(self, step: int) -> np.ndarray:
        """Record indices (into the split) of global batch ``step``, all processes' rows."""
        start = step * self.global_batch_size
        return np.asarray([self._indices[start + r] for r in range(self.global_batch_size)], np.int64)

    def local_indices(self, step: int) -> np.ndarray:
        """Record indices of this process's rows of global batch ``step``."""
        b = self.local_batch_size
        return self.global_indices(step)[self.process_index * b:(self.process_index + 1) * b]

    # -- shapes ----------------------------------------------------------------------
    @property
    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes / dtypes of one local batch (this process's rows)."""
        return self._spec(self.local_batch_size)

    @property
    def global_element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes / dtypes of one global batch (as assembled over the mesh)."""
        return self._spec(self.global_batch_size)

    def _spec(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = {}
        for k in self.keys:
            if k == "image":
                if self.image_shape is None:
                    raise ImageShapeError(f"{self.name}: image shape unknown")
                spec[k] = jax.ShapeDtypeStruct((rows, *self.image_shape), np.float32)
            elif k == "label":
                spec[k] = jax.ShapeDtypeStruct((rows,), np.int32)
            else:
                spec[k] = jax.ShapeDtypeStruct((rows, *np.shape(self[0][k])[1:]), np.asarray(self[0][k]).dtype)
        return spec

    def check_image_shape(self, expected: Sequence[int], what: str = "the model") -> None:
        """Raise :class:`ImageShapeError` unless the images are ``expected`` = (H, W, C)."""
        check_image_shape(self.image_shape, expected, dataset=self.name, what=what)

    # -- reading ---------------------------------------------------------------------
    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step`` (numpy)."""
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        if self._arrays is not None:
            rows = self.local_indices(step)
            return _to_model({k: v[rows] for k, v in self._arrays.items()}, self.keys)
        return self._batches[step]

    def iterate(self, start_step: int = 0, num_steps: int | None = None, *, mesh=None,
                prefetch: int = 4, num_threads: int = 2) -> Iterator[dict]:
        """Batches ``start_step, start_step + 1, ...`` (``num_steps`` of them, or forever).

        Reading runs ahead in ``num_threads`` threads, at most ``prefetch``
        batches. With ``mesh``, yields global arrays split over the mesh
        (:func:`jdistill.train.mesh.global_batch`); otherwise this process's
        numpy rows. Arguments are checked here, before the first batch is asked for.
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if mesh is not None and self.global_batch_size % mesh.size:
            raise ValueError(f"{self.name}: global batch size {self.global_batch_size} is not "
                             f"divisible by the {mesh.size} devices of the mesh")
        if mesh is not None and (self.process_count, self.process_index) != (jax.process_count(),
                                                                             jax.process_index()):
            raise ValueError(f"{self.name}: this source reads the rows of process {self.process_index} "
                             f"of {self.process_count}, but JAX runs process {jax.process_index()} of "
                             f"{jax.process_count()}; global arrays need the JAX slots")
        stop = None if num_steps is None else start_step + int(num_steps)
        if self._arrays is not None:
            steps = itertools.count(start_step) if stop is None else range(start_step, stop)
            batches = (self[k] for k in steps)
        else:
            batches = self._batches[start_step:stop].to_iter_dataset(
                grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
        if mesh is None:
            return iter(batches)
        from jdistill.train.mesh import global_batch

        return (global_batch(local, mesh) for local in batches)


def check_image_shape(actual: Sequence[int] | None, expected: Sequence[int], *, dataset: str = "dataset",
                      what: str = "the model") -> None:
    """Raise :class:`ImageShapeError` when (H, W, C) ``actual`` is not ``expected``."""
    if actual is None or tuple(actual) != tuple(expected):
        raise ImageShapeError(
            f"{dataset} gives images of shape {None if actual is None else tuple(actual)} (H, W, C) "
            f"but {what} expects {tuple(expected)}: pick the matching dataset / config or "
            f"change the model's image size and channels")


def make_batch_source(dataset: str | tfds.core.DatasetBuilder, split: str = "train", *,
                      global_batch_size: int, seed: int, data_dir: str | os.PathLike | None = None,
                      keys: Sequence[str] | None = None, process_index: int | None = None,
                      process_count: int | None = None,
                      record_transform: Callable[[dict], dict] | None = None,
                      image_shape: Sequence[int] | None = None, in_memory: bool | None = None) -> BatchSource:
    """A :class:`BatchSource` over ``split`` of a dataset name (see :func:`load_builder`) or builder.

    ``image_shape`` defaults to the builder's image feature shape (give it when a
    ``record_transform`` changes it).
    """
    builder = dataset if isinstance(dataset, tfds.core.DatasetBuilder) else load_builder(dataset, data_dir)
    name = builder.info.full_name
    if split not in builder.info.splits:
        raise KeyError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
    feature_shape, has_label = _feature_spec(builder.info.features)
    if keys is None:
        keys = ("image", "label") if has_label else ("image",)
    missing = [k for k in keys if k not in builder.info.features]
    if missing:
        raise KeyError(f"{name} has no feature(s) {missing}; it has {sorted(builder.info.features)}")
    return BatchSource(builder.as_data_source(split), global_batch_size=global_batch_size, seed=seed,
                       image_shape=image_shape if image_shape is not None else feature_shape,
                       keys=keys, process_index=process_index, process_count=process_count,
                       record_transform=record_transform, name=f"{name}[{split}]", in_memory=in_memory)
