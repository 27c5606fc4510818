"""Data layer: the TFDS builders (built here, without TensorFlow) and the grain pipeline."""

import hashlib
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from jdistill.data import digits as digits_mod
from jdistill.data import photo_patches as pp
from jdistill.data._tfds import BundledDataBuilder, png_bytes
from jdistill.data.pipeline import (
    BatchSource,
    DatasetNotAvailableError,
    ImageShapeError,
    load_builder,
    make_batch_source,
)
from jdistill.train.mesh import make_mesh

B = 64  # 1497 / 64 = 23.4 steps per epoch: batch 23 straddles the first epoch boundary


class JdistillTestTiny(BundledDataBuilder):
    """A builder that is not one of jdistill's LOCAL_BUILDERS: it exercises the path for
    "any other TFDS dataset", read only when already prepared."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 3), dtype=np.uint8)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(10):
            yield i, {"image": png_bytes(np.full((4, 4, 3), 20 * i, np.uint8))}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def digits_builder(data_dir):
    return load_builder("digits", data_dir)


def _source(data_dir, seed=0, batch=B, **kw):
    return make_batch_source("digits", "train", global_batch_size=batch, seed=seed, data_dir=data_dir, **kw)


# -- builders ----------------------------------------------------------------------------
def test_digits_builder_matches_sklearn(digits_builder):
    b = digits_builder
    assert b.is_prepared() and b.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert {k: v.num_examples for k, v in b.info.splits.items()} == digits_mod.SPLIT_SIZES
    assert digits_mod.SPLIT_SIZES == {"train": 1497, "test": 300}
    sk = load_digits()
    ids = {}
    for split in ("train", "test"):
        src = b.as_data_source(split)
        recs = src.__getitems__(list(range(len(src))))
        ids[split] = np.array([r["id"] for r in recs])
        for r in recs:
            assert r["image"].shape == (8, 8, 1) and r["image"].dtype == np.uint8
            # the documented rule, and that it loses nothing
            np.testing.assert_array_equal(r["image"][..., 0], (255 * sk.images[r["id"]].astype(int) + 8) // 16)
            np.testing.assert_array_equal(np.round(r["image"][..., 0].astype(int) * 16 / 255), sk.images[r["id"]])
            assert r["label"] == sk.target[r["id"]]
    assert np.array_equal(np.sort(np.concatenate([ids["train"], ids["test"]])), np.arange(1797))
    # the documented split rule, re-derived: per class, the 30 smallest SHA-256 keys
    key = lambda i: hashlib.sha256(f"jdistill-digits-v1:{i}".encode()).hexdigest()  # noqa: E731
    expected = sorted(i for c in range(10) for i in sorted(np.flatnonzero(sk.target == c), key=key)[:30])
    assert ids["test"].tolist() == expected
    assert np.bincount(sk.target[ids["test"]]).tolist() == [30] * 10
    assert "tensorflow" not in sys.modules


def test_prepared_builder_is_reused(digits_builder, data_dir):
    files = sorted(pathlib.Path(digits_builder.data_path).glob("*array_record*"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = load_builder("digits", data_dir)
    assert again.is_prepared()
    assert [f.stat().st_mtime_ns for f in files] == mtimes


@pytest.mark.parametrize("patch", [32, 64])
def test_photo_patches_split_by_photograph(data_dir, patch):
    b = load_builder(f"photo_patches/{patch}", data_dir)
    assert {k: v.num_examples for k, v in b.info.splits.items()} == pp.SPLIT_SIZES[patch]
    photos = {}
    for split in ("train", "test"):
        src = b.as_data_source(split)
        recs = src.__getitems__(list(range(len(src))))
        photos[split] = {r["photo"].decode() for r in recs}
        for r in recs[:: max(1, len(recs) // 50)]:
            y, x = r["position"]
            assert r["image"].shape == (patch, patch, 3) and r["image"].dtype == np.uint8
            np.testing.assert_array_equal(r["image"], pp.load_photo(r["photo"].decode())[y:y + patch, x:x + patch])
    assert not photos["train"] & photos["test"]
    assert photos["test"] == set(pp.TEST_PHOTOS)
    assert photos["train"] == set(pp.TRAIN_PHOTOS)
    # the stereo pair is one scene: never split across train / test
    assert {"motorcycle_left", "motorcycle_right"} <= photos["train"]


def test_photo_crops_follow_the_rules():
    # retina's black surround is dropped, and a big photograph is capped
    pos = pp.crop_positions("retina", 32)
    assert len(pos) == 512 * 512 // 32**2
    img = pp.load_photo("retina").mean(-1)
    assert all(img[y:y + 32, x:x + 32].std() >= pp.BLANK_STD for y, x in pos)
    assert pos == sorted(pos)
    # grey photographs become 3 equal channels
    cam = pp.load_photo("camera")
    assert cam.shape == (512, 512, 3) and (cam[..., 0] == cam[..., 2]).all()


# -- pipeline ----------------------------------------------------------------------------
def test_batches_are_a_function_of_the_seed(digits_builder, data_dir):
    a, b, c = _source(data_dir, seed=0), _source(data_dir, seed=0), _source(data_dir, seed=1)
    x = a[3]
    assert x["image"].shape == (B, 8, 8, 1) and x["image"].dtype == np.float32
    assert x["label"].shape == (B,) and x["label"].dtype == np.int32
    assert x["image"].min() == -1.0 and x["image"].max() == 1.0
    np.testing.assert_array_equal(x["image"], b[3]["image"])
    np.testing.assert_array_equal(x["label"], b[3]["label"])
    assert not np.array_equal(x["label"], c[3]["label"])
    # batch k holds exactly the records global_indices(k) names, mapped to [-1, 1]
    src = digits_builder.as_data_source("train")
    recs = [src[int(i)] for i in a.global_indices(3)]
    expected = np.stack([r["image"] for r in recs]).astype(np.float32) / np.float32(127.5) - np.float32(1)
    np.testing.assert_array_equal(x["image"], expected)
    np.testing.assert_array_equal(x["label"], [r["label"] for r in recs])


def test_resume_at_step_k_gives_the_uninterrupted_batches(data_dir):
    full = list(_source(data_dir, seed=7).iterate(0, 30))
    resumed = list(_source(data_dir, seed=7).iterate(21, 9))  # a fresh source, as after a restart
    assert len(full) == 30 and len(resumed) == 9
    for k, batch in enumerate(resumed, start=21):
        np.testing.assert_array_equal(batch["image"], full[k]["image"])
        np.testing.assert_array_equal(batch["label"], full[k]["label"])
    src = _source(data_dir, seed=7)
    np.testing.assert_array_equal(src[29]["label"], full[29]["label"])


@pytest.mark.parametrize("procs", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(data_dir, procs):
    whole = _source(data_dir, seed=3, process_index=0, process_count=1)
    parts = [_source(data_dir, seed=3, process_index=i, process_count=procs) for i in range(procs)]
    assert parts[0].element_spec["image"].shape == (B // procs, 8, 8, 1)
    assert parts[0].global_element_spec["image"].shape == (B, 8, 8, 1)
    for k in (0, 23, 40):  # 23 straddles an epoch boundary
        got = [p[k] for p in parts]
        np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), whole[k]["image"])
        np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), whole[k]["label"])
        for i, p in enumerate(parts):
            rows = slice(i * B // procs, (i + 1) * B // procs)
            np.testing.assert_array_equal(p.local_indices(k), whole.global_indices(k)[rows])


def test_epoch_boundaries(data_dir):
    src = _source(data_dir, seed=5)
    n = src.num_examples
    assert n == 1497 and src.steps_per_epoch == pytest.approx(n / B)
    stream = np.concatenate([src.global_indices(k) for k in range(2 * n // B + 2)])
    e0, e1 = stream[:n], stream[n:2 * n]
    assert np.array_equal(np.sort(e0), np.arange(n)) and np.array_equal(np.sort(e1), np.arange(n))
    assert not np.array_equal(e0, e1)  # reshuffled each epoch
    k = n // B  # the batch that straddles: the end of epoch 0, then the start of epoch 1
    assert src.epoch_of_step(k) == 0 and src.epoch_of_step(k + 1) == 1
    np.testing.assert_array_equal(src.global_indices(k), np.concatenate([e0[k * B:], e1[:(k + 1) * B - n]]))


@pytest.mark.parametrize("procs", [1, 2])
def test_in_memory_batches_equal_streamed_batches(data_dir, procs):
    """Holding a small split in memory changes the speed, never the rows or their order."""
    n_batches = 1497 // B + 3  # across the first epoch boundary
    for i in range(procs):
        kw = dict(seed=3, process_index=i, process_count=procs)
        streamed, held = _source(data_dir, in_memory=False, **kw), _source(data_dir, in_memory=True, **kw)
        for k, batch in enumerate(held.iterate(0, n_batches)):
            ref = streamed[k]
            assert batch.keys() == ref.keys()
            for key in ref:
                np.testing.assert_array_equal(batch[key], ref[key])
    assert _source(data_dir).in_memory  # a split this small is held in memory by default


def test_iterate_assembles_global_arrays_on_a_mesh(data_dir):
    mesh = make_mesh(data=4, fsdp=2)
    src = _source(data_dir, seed=2)
    (g,) = list(src.iterate(4, 1, mesh=mesh))
    assert isinstance(g["image"], jax.Array) and g["image"].shape == (B, 8, 8, 1)
    assert len(g["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g["image"]), src[4]["image"])
    np.testing.assert_array_equal(np.asarray(g["label"]), src[4]["label"])
    with pytest.raises(ValueError, match="not divisible"):
        _source(data_dir, batch=12).iterate(0, 1, mesh=mesh)


_WORKER = """
import sys
import jax
import numpy as np
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.sharding import NamedSharding, PartitionSpec as P
from jdistill.data.pipeline import make_batch_source
from jdistill.train.mesh import make_mesh
mesh = make_mesh()
src = make_batch_source("digits", global_batch_size=64, seed=11, data_dir=data_dir)
whole = make_batch_source("digits", global_batch_size=64, seed=11, data_dir=data_dir,
                          process_index=0, process_count=1)
replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
assert src.local_batch_size == 32 and len(jax.devices()) == 4
for k, g in enumerate(src.iterate(21, 4, mesh=mesh), start=21):
    for name, arr in g.items():
        assert arr.shape[0] == 64
        np.testing.assert_array_equal(np.asarray(replicate(arr)), whole[k][name])
print("ok", pid)
"""


def test_two_processes_assemble_the_global_batch(data_dir, tmp_path):
    """Two real JAX processes (gloo over loopback, 2 CPU devices each): each reads its half,
    global_batch assembles them, and the result is the single-process global batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), data_dir], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]


def test_image_shape_is_checked(data_dir):
    src = _source(data_dir)
    assert src.image_shape == (8, 8, 1)
    src.check_image_shape((8, 8, 1))
    with pytest.raises(ImageShapeError, match=r"\(8, 8, 1\).*\(64, 64, 3\)"):
        src.check_image_shape((64, 64, 3))
    with pytest.raises(ImageShapeError, match="fixed"):
        BatchSource([{}], global_batch_size=1, seed=0, image_shape=(None, None, 3))


def test_bad_batch_sizes(data_dir):
    with pytest.raises(ValueError, match="multiple of the process count"):
        _source(data_dir, batch=63, process_index=0, process_count=2)


def test_missing_and_unknown_datasets_give_clear_errors(tmp_path, data_dir):
    where = re.escape(str(tmp_path))
    with pytest.raises(DatasetNotAvailableError, match=rf"'cifar10' is not prepared.*{where}"):
        load_builder("cifar10", tmp_path)
    with pytest.raises(DatasetNotAvailableError, match=rf"unknown dataset 'no_such_dataset_xyz'.*{where}"):
        load_builder("no_such_dataset_xyz", tmp_path)
    with pytest.raises(DatasetNotAvailableError, match="never downloads"):
        load_builder("huggingface:mnist", tmp_path)
    # a non-jdistill dataset is never built, only read once prepared
    with pytest.raises(DatasetNotAvailableError, match="jdistill_test_tiny"):
        load_builder("jdistill_test_tiny", tmp_path)
    JdistillTestTiny(data_dir=str(tmp_path)).download_and_prepare()
    src = make_batch_source("jdistill_test_tiny", global_batch_size=5, seed=0, data_dir=tmp_path)
    assert src.keys == ("image",) and src[0]["image"].shape == (5, 4, 4, 3)
    with pytest.raises(KeyError, match="no split 'validation'"):
        make_batch_source("digits", "validation", global_batch_size=5, seed=0, data_dir=data_dir)
