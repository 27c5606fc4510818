"""``photo_classifier``: a small CNN that tells which photograph a 32x32 photo_patches crop comes from,
shipped trained: the feature space of the FD on photographs (as the digits classifier is for digits).

Trained on the ``photo_patches/32`` train split (17 photographs, 3525 crops), each crop labelled by
its photograph, with random flips and 90-degree turns, so its features describe texture, colour
and structure rather than where a crop sits. ``photo_fd(samples)`` is the Frechet distance
between its penultimate features of ``samples`` and of the held-out split (4 other photographs,
973 crops): FID's recipe with a network that fits 32x32 crops. The weights ship in
``jdistill/assets/photo_classifier.msgpack`` with their config, accuracy and real-vs-real FD floors
in ``photo_classifier.json``; loading them never retrains.

Retrain (deterministic from the seed; a few minutes on a CPU) with
``python -m jdistill.metrics.photo_classifier``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdistill.data.photo_patches import TRAIN_PHOTOS, photo_patches_arrays
from jdistill.metrics.classifier import ASSETS, Classifier, fit, load_classifier, save_classifier
from jdistill.metrics.frechet import frechet_distance_from_stats, gaussian_stats

STEM = "photo_classifier"
PATCH = 32
IMAGE_SHAPE = (PATCH, PATCH, 3)


class PhotoCNN(nn.Module):
    """conv-conv-pool-conv-pool-conv-pool-dense: (N, 32, 32, 3) in [-1, 1] -> (logits, features)."""

    channels: tuple[int, int, int] = (32, 64, 64)
    feature_dim: int = 64
    num_classes: int = len(TRAIN_PHOTOS)

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, kernel_size=(3, 3))
        x = nn.silu(conv(self.channels[0], name="conv_0")(x))
        x = nn.silu(conv(self.channels[0], name="conv_1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.silu(conv(self.channels[1], name="conv_2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.silu(conv(self.channels[2], name="conv_3")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.silu(nn.Dense(self.feature_dim, name="features")(x))  # smooth: no dead feature units
        return nn.Dense(self.num_classes, name="head")(features), features


def as_model_input(images) -> np.ndarray:
    """(N, 32, 32, 3) uint8 0..255 or float in [-1, 1] (clipped) -> float32 in [-1, 1]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"photo crops must be (N, {PATCH}, {PATCH}, 3), got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    return np.clip(x.astype(np.float32), -1.0, 1.0)


def _flip_turn(x, key):
    """Each crop flipped left-right with probability 1/2 and turned by a random multiple of 90 degrees."""
    k_flip, k_turn = jax.random.split(key)
    n = x.shape[0]
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    turns = jax.random.randint(k_turn, (n,), 0, 4)
    options = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])
    return options[turns, jnp.arange(n)]


def _module(model_cfg: dict) -> PhotoCNN:
    return PhotoCNN(tuple(model_cfg["channels"]), int(model_cfg["feature_dim"]), int(model_cfg["num_classes"]))


def train_photo_classifier(*, seed: int = 0, steps: int = 2000, batch_size: int = 128, learning_rate: float = 2e-3,
                           weight_decay: float = 1e-4) -> Classifier:
    t0 = time.time()
    train = photo_patches_arrays("train", PATCH)
    names = sorted(set(train["photo"].tolist()))
    labels = np.asarray([names.index(p) for p in train["photo"]], np.int32)
    module = PhotoCNN(num_classes=len(names))
    params, loss = fit(module, as_model_input(train["image"]), labels, seed=seed, steps=steps, batch_size=batch_size,
                       learning_rate=learning_rate, weight_decay=weight_decay, augment=_flip_turn)
    clf = Classifier(module, params, {}, IMAGE_SHAPE, as_model_input)
    config = {
        "model": {"channels": list(module.channels), "feature_dim": module.feature_dim, "num_classes": len(names)},
        "classes": names,
        "input": "float32 (N, 32, 32, 3) in [-1, 1] (uint8 0..255 accepted)",
        "training": {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                     "weight_decay": weight_decay, "augmentation": "flips, 90-degree turns",
                     "final_loss": float(loss), "seconds": round(time.time() - t0, 1),
                     "backend": jax.default_backend(), "data": "jdistill.data.photo_patches/32 train split"},
        "train_accuracy": clf.accuracy(train["image"], labels),
    }
    return Classifier(module, params, config, IMAGE_SHAPE, as_model_input)


@functools.lru_cache(maxsize=1)
def load_photo_classifier() -> Classifier:
    """The classifier shipped in ``jdistill/assets`` (loaded once, never retrained)."""
    from jdistill.errors import MissingInput

    if not (ASSETS / f"{STEM}.msgpack").is_file():
        raise MissingInput(f"no {STEM}.msgpack in {ASSETS}: train it once with `python -m "
                           "jdistill.metrics.photo_classifier` (the FD on photographs reads its features)")
    return load_classifier(ASSETS, STEM, _module, IMAGE_SHAPE, as_model_input)


@functools.lru_cache(maxsize=2)
def reference_stats(split: str = "test"):
    return gaussian_stats(load_photo_classifier().features(photo_patches_arrays(split, PATCH)["image"]))


def photo_fd(images, reference: str = "test", *, classifier: Classifier | None = None) -> float:
    """Frechet distance of 32x32 crops to the photo_patches ``reference`` split in the classifier's features."""
    if classifier is None:
        mu_r, s_r = reference_stats(reference)
        clf = load_photo_classifier()
    else:
        clf = classifier
        mu_r, s_r = gaussian_stats(clf.features(photo_patches_arrays(reference, PATCH)["image"]))
    mu, sigma = gaussian_stats(clf.features(images))
    return frechet_distance_from_stats(mu, sigma, mu_r, s_r)


def real_vs_real_fd(clf: Classifier) -> dict:
    """FD floors: the train split against the held-out one (other photographs), and two halves of the held-out."""
    test = clf.features(photo_patches_arrays("test", PATCH)["image"])
    train = clf.features(photo_patches_arrays("train", PATCH)["image"])
    rng = np.random.default_rng(0).permutation(len(test))
    a, b = test[rng[: len(test) // 2]], test[rng[len(test) // 2:]]
    return {"train_vs_test": frechet_distance_from_stats(*gaussian_stats(train), *gaussian_stats(test)),
            "test_half_vs_half": frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Retrain the photo classifier and write its assets.")
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args(argv)
    clf = train_photo_classifier(seed=args.seed, steps=args.steps)
    clf.config["fd_floor"] = real_vs_real_fd(clf)
    save_classifier(clf, args.out, STEM)
    print(json.dumps(clf.config, indent=2))


if __name__ == "__main__":
    main()
