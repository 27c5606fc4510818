"""A small CNN for the 8x8 digits, shipped trained: the feature space of jdistill's quality metric.

``digits_fd(samples)`` is the Frechet distance between the classifier's
penultimate features of ``samples`` and of the digits held-out split (FID's
recipe, with a network that fits 8x8 digits instead of Inception). The
trained weights ship in ``jdistill/assets/digits_classifier.msgpack`` with
their config, held-out accuracy and real-vs-real FD floors in
``digits_classifier.json``; loading them never retrains.

Retrain (deterministic from the seed; a few seconds on a CPU) and rewrite the
assets with ``python -m jdistill.metrics.classifier``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jdistill.data.digits import NUM_CLASSES, digits_arrays
from jdistill.metrics.frechet import frechet_distance_from_stats, gaussian_stats

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_FILE = "digits_classifier.msgpack"
CONFIG_FILE = "digits_classifier.json"
IMAGE_SHAPE = (8, 8, 1)
_CHUNK = 512


class DigitsCNN(nn.Module):
    """conv-conv-pool-conv-pool-dense: (N, 8, 8, 1) in [-1, 1] -> (logits, penultimate features)."""

    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 64
    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(conv(self.channels[0], name="conv_0")(x))
        x = nn.silu(conv(self.channels[0], name="conv_1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.silu(conv(self.channels[1], name="conv_2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        # A smooth activation keeps every feature unit alive, so the feature
        # covariance has no exactly-zero directions for the Frechet distance.
        features = nn.silu(nn.Dense(self.feature_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="features")(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="head")(features)
        return logits, features


def as_model_input(images) -> np.ndarray:
    """Digits as the classifier's input: float32 (N, 8, 8, 1) in [-1, 1].

    uint8 images are 0..255 (the ``digits`` dataset's scale). Float images are
    the models' [-1, 1] scale and are clipped to it, as a sample is when saved
    as an image; float values far outside it (|x| > 4) are a scale mistake
    (0..255 or 0..16 floats) and raise. (N, 8, 8) is taken as one channel.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"digits images must be (N, 8, 8, 1) or (N, 8, 8), got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"digits images must be uint8 (0..255) or float ([-1, 1]), got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{np.count_nonzero(~np.isfinite(x))} NaN / inf pixel values")
    if np.abs(x).max() > 4.0:
        raise ValueError(f"float images must be in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}] "
                         "(pass 0..255 images as uint8)")
    return np.clip(x, -1.0, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A trained classifier (logits, features) with its params; methods take any batch size, return
    numpy. ``prepare`` turns images into the network's input of shape ``image_shape``."""

    module: Any
    params: Any
    config: dict
    image_shape: tuple = IMAGE_SHAPE
    prepare: Callable = as_model_input

    @functools.cached_property
    def _apply(self):
        return jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def _run(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = self.prepare(images)
        n = x.shape[0]
        # Fixed chunk shapes: one compilation whatever the number of images.
        chunk = _CHUNK if n >= _CHUNK else max(8, 1 << (max(n, 1) - 1).bit_length())
        logits, feats = [], []
        for s in range(0, n, chunk):
            part = x[s:s + chunk]
            pad = chunk - part.shape[0]
            if pad:
                part = np.concatenate([part, np.full((pad, *self.image_shape), -1.0, np.float32)])
            lg, ft = self._apply(self.params, part)
            logits.append(np.asarray(lg)[:chunk - pad])
            feats.append(np.asarray(ft)[:chunk - pad])
        if not logits:
            return (np.zeros((0, self.module.num_classes), np.float32),
                    np.zeros((0, self.module.feature_dim), np.float32))
        return np.concatenate(logits), np.concatenate(feats)

    def logits(self, images) -> np.ndarray:
        return self._run(images)[0]

    def features(self, images) -> np.ndarray:
        """Penultimate activations, (N, feature_dim) float32: the Frechet distance's feature space."""
        return self._run(images)[1]

    def predict(self, images) -> np.ndarray:
        """Predicted class, (N,) int32."""
        return self.logits(images).argmax(-1).astype(np.int32)

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


DigitsClassifier = Classifier  # the digits' (its defaults)


def _module_from_config(model_cfg: dict) -> DigitsCNN:
    return DigitsCNN(channels=tuple(model_cfg["channels"]), feature_dim=int(model_cfg["feature_dim"]),
                     num_classes=int(model_cfg["num_classes"]))


def _shift(images, key, max_shift: int):
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    n = images.shape[0]
    pad = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), IMAGE_SHAPE)  # noqa: E731
    return jax.vmap(crop)(pad, offsets)


def fit(module, x_train, y_train, *, seed: int, steps: int, batch_size: int, learning_rate: float,
        weight_decay: float, augment: Callable | None = None):
    """(params, final loss): AdamW with warmup + cosine on softmax cross-entropy, batches drawn
    from ``numpy.random.default_rng(seed)``, init and ``augment(x, key)`` keys from ``key(seed)``."""
    key_init, key_aug = jax.random.split(jax.random.key(seed))
    params = module.init(key_init, jnp.zeros((1, *x_train.shape[1:])))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10), steps)
    opt = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        if augment is not None:
            x = augment(x, key)

        def loss_fn(p):
            logits, _ = module.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(y_train)), 0
    for i in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(y_train)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx],
                                       jax.random.fold_in(key_aug, i))
    return jax.device_get(params), loss


def train_digits_classifier(*, seed: int = 0, steps: int = 1500, batch_size: int = 128,
                            learning_rate: float = 3e-3, weight_decay: float = 1e-4,
                            channels: tuple[int, int] = (32, 64), feature_dim: int = 64,
                            max_shift: int = 1) -> DigitsClassifier:
    """Train :class:`DigitsCNN` on the digits ``train`` split; the config records held-out accuracy.

    Deterministic for a given seed on a given backend: the batch order comes
    from ``numpy.random.default_rng(seed)``, init and augmentation from
    ``jax.random.key(seed)``. Augmentation: random shifts of up to
    ``max_shift`` pixels, so the features care about shape more than position.
    """
    t0 = time.time()
    train, test = digits_arrays("train"), digits_arrays("test")
    x_train, y_train = as_model_input(train["image"]), train["label"]
    module = DigitsCNN(channels=tuple(channels), feature_dim=feature_dim)
    augment = (lambda x, key: _shift(x, key, max_shift)) if max_shift else None
    params, loss = fit(module, x_train, y_train, seed=seed, steps=steps, batch_size=batch_size,
                       learning_rate=learning_rate, weight_decay=weight_decay, augment=augment)
    clf = DigitsClassifier(module, params, {})
    config = {
        "model": {"channels": list(channels), "feature_dim": feature_dim, "num_classes": NUM_CLASSES},
        "input": "float32 (N, 8, 8, 1) in [-1, 1] (uint8 0..255 accepted)",
        "training": {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                     "weight_decay": weight_decay, "max_shift": max_shift, "final_loss": float(loss),
                     "seconds": round(time.time() - t0, 1), "backend": jax.default_backend(),
                     "data": "jdistill.data.digits train split (1497)"},
        "train_accuracy": clf.accuracy(train["image"], train["label"]),
        "test_accuracy": clf.accuracy(test["image"], test["label"]),
        "num_test": int(len(test["label"])),
    }
    return DigitsClassifier(module, params, config)


def real_vs_real_fd(clf: DigitsClassifier, subsample: int = 1000, seed: int = 0) -> dict[str, float]:
    """The FD floors of real data: what a perfect generator scores with ``digits_fd``.

    ``subsample`` train digits (at most all 1497 of the split) against the held-out split:
    the floor for that many samples."""
    feats = {s: clf.features(digits_arrays(s)["image"]) for s in ("train", "test")}
    stats = {s: gaussian_stats(f) for s, f in feats.items()}
    if not 2 <= subsample:
        raise ValueError(f"subsample must be >= 2 digits, got {subsample}")
    subsample = min(int(subsample), len(feats["train"]))
    sub = np.random.default_rng(seed).choice(len(feats["train"]), subsample, replace=False)
    mu_sub, s_sub = gaussian_stats(feats["train"][sub])
    return {
        "subsample": subsample,
        "train_vs_test": frechet_distance_from_stats(*stats["train"], *stats["test"]),
        f"train{subsample}_vs_test": frechet_distance_from_stats(mu_sub, s_sub, *stats["test"]),
        f"train{subsample}_vs_train": frechet_distance_from_stats(mu_sub, s_sub, *stats["train"]),
    }


def save_classifier(clf: Classifier, directory: str | pathlib.Path = ASSETS,
                    stem: str = "digits_classifier") -> pathlib.Path:
    """Write ``<stem>.msgpack`` + ``.json`` (config, accuracy, weights' SHA-256) to ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = serialization.to_bytes(clf.params)
    config = dict(clf.config, weights_sha256=hashlib.sha256(blob).hexdigest())
    (directory / f"{stem}.msgpack").write_bytes(blob)
    (directory / f"{stem}.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_classifier(directory: str | pathlib.Path, stem: str = "digits_classifier",
                    module_from_config: Callable = None, image_shape: tuple = IMAGE_SHAPE,
                    prepare: Callable = as_model_input) -> Classifier:
    """A classifier saved by :func:`save_classifier` (checks the weights' SHA-256); the digits' by default."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / f"{stem}.json").read_text())
    blob = (directory / f"{stem}.msgpack").read_bytes()
    if hashlib.sha256(blob).hexdigest() != config["weights_sha256"]:
        raise ValueError(f"{directory / (stem + '.msgpack')} does not match the SHA-256 recorded in {stem}.json")
    module = (module_from_config or _module_from_config)(config["model"])
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *image_shape)))["params"])
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    params = serialization.from_bytes(target, blob)
    return Classifier(module, params, config, tuple(image_shape), prepare)


@functools.lru_cache(maxsize=1)
def load_digits_classifier() -> DigitsClassifier:
    """The classifier shipped in ``jdistill/assets`` (loaded once, never retrained)."""
    return load_classifier(ASSETS)


@functools.lru_cache(maxsize=4)
def _reference_stats_default(reference: str) -> tuple[np.ndarray, np.ndarray]:
    return reference_stats(reference, load_digits_classifier())


def reference_stats(reference: str = "test", classifier: DigitsClassifier | None = None):
    """(mean, covariance) of the classifier's features on the digits ``test`` or ``train`` split."""
    if reference not in ("test", "train"):
        raise ValueError(f"reference must be 'test' or 'train', got {reference!r}")
    if classifier is None:
        return _reference_stats_default(reference)
    return gaussian_stats(classifier.features(digits_arrays(reference)["image"]))


def digits_fd(images, reference: str = "test", *, classifier: DigitsClassifier | None = None,
              min_samples: int | None = None) -> float:
    """Frechet distance of digit ``images`` to the digits ``reference`` split, in the classifier's features.

    ``images``: (N, 8, 8[, 1]) uint8 0..255 or float in [-1, 1] (see
    :func:`as_model_input`). Needs N > feature_dim (64) samples unless
    ``min_samples`` allows fewer; compare only FDs from equal N (the estimate is
    biased upwards at small N: see ``fd_floor`` in the shipped json).
    """
    clf = classifier or load_digits_classifier()
    mu, sigma = gaussian_stats(clf.features(images), min_samples=min_samples)
    return frechet_distance_from_stats(mu, sigma, *reference_stats(reference, classifier))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Retrain the digits classifier and write its assets.")
    p.add_argument("--out", default=str(ASSETS), help="directory for the .msgpack and .json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    clf = train_digits_classifier(seed=args.seed, steps=args.steps)
    clf.config["fd_floor"] = real_vs_real_fd(clf)
    clf.config["fd_floor_rule"] = ("digits_fd of real digits: all 1497 train vs the test split; 1000 train rows "
                                   "(numpy default_rng(0).choice, no replacement) vs test and vs train")
    out = save_classifier(clf, args.out)
    print(json.dumps(clf.config, indent=2))
    print(f"wrote {out / WEIGHTS_FILE} ({(out / WEIGHTS_FILE).stat().st_size} bytes) and {out / CONFIG_FILE}")


if __name__ == "__main__":
    main()
