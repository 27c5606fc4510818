"""Oracles: a per-sample quality score that decides which student samples the teacher improves
(adaptive teacher-student collaboration). Higher is better. Registered by name:

* ``digits_confidence``: log-odds log(p / (1 - p)) of the sample's intended class under a *second*
  digits classifier (``jdistill/assets/digits_oracle/``: another width and seed than the
  classifier FD is measured in, trained by the same code), or of its most likely class
  without labels. Scoring with the FD network itself would let the selection game the metric.
* ``digits_realism``: the realism score of Kynkaanniemi et al. (2019) in that second classifier's
  feature space: max over real digits phi of r(phi) / ||f - phi||, r(phi) the distance from phi to
  its k-th nearest real neighbour, over the train split's digits of the sample's intended class
  (all digits without labels), the half with the largest radii dropped (the paper's pruning).
  Above 1: inside some real digit's neighbourhood. It asks "does this look like a real digit of
  its class", where confidence asks "is it unambiguous" (an atypical but clear digit scores high
  on confidence and low here).
* ``clip_score``: 100 x cos(image, prompt) of a CLIP model (transformers' ``CLIPModel``
  layout, converted from a local folder), the CLIPScore scale;
* ``pickscore``: a PickScore-style reward, exp(logit_scale) x cos(image, prompt), of a CLIP
  model fine-tuned on preferences (PickScore_v1 is a ``CLIPModel``; pass its folder and the
  CLIP-ViT-H-14 processor's tokenizer folder).

    oracle = oracles.get("digits_confidence")
    scores = oracle.score(images, labels)          # images float [-1, 1] or uint8, (N,) float32

Each oracle carries its ``provenance`` (what calibration files record and check).
Retrain the digits oracle and rewrite its asset with ``python -m jdistill.metrics.oracles``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.metrics import classifier as classifier_lib

DIGITS_ORACLE_DIR = classifier_lib.ASSETS / "digits_oracle"
# the second classifier: narrower, another seed, no augmentation (the FD network: 32/64, seed 0, shifts)
DIGITS_ORACLE_TRAINING = dict(seed=1, channels=(16, 32), feature_dim=32, max_shift=0)


@dataclasses.dataclass(frozen=True)
class Oracle:
    name: str
    score_fn: Callable  # (images, conditions) -> (N,) scores, higher is better
    provenance: dict  # what identifies it: weights' hash, model folder, scale

    def score(self, images, conditions=None) -> np.ndarray:
        return np.asarray(self.score_fn(images, conditions), np.float32)


ORACLES: dict[str, Callable[..., Oracle]] = {}


def register(name: str):
    def add(factory):
        ORACLES[name] = factory
        return factory

    return add


def get(name: str, **options) -> Oracle:
    from jdistill.errors import InvalidArgument

    if name not in ORACLES:
        raise InvalidArgument(f"unknown oracle {name!r}; known: {sorted(ORACLES)}")
    return ORACLES[name](**options)


@functools.lru_cache(maxsize=1)
def digits_oracle_classifier() -> classifier_lib.DigitsClassifier:
    return classifier_lib.load_classifier(DIGITS_ORACLE_DIR)


@register("digits_confidence")
def digits_confidence() -> Oracle:
    clf = digits_oracle_classifier()

    def score(images, labels=None):
        # log(p / (1 - p)) from the logits: the order of p, but log p saturates at 0 in float32 for a
        # confident classifier, and tied scores would leave k% of samples no longer below tau
        logits = np.asarray(clf.logits(images), np.float64)
        rows = np.arange(len(logits))
        own = logits.argmax(-1) if labels is None else np.asarray(labels, np.int64)
        others = logits.copy()
        others[rows, own] = -np.inf
        top = others.max(-1)
        return logits[rows, own] - (top + np.log(np.exp(others - top[:, None]).sum(-1)))

    return Oracle("digits_confidence", score, {"oracle": "digits_confidence", "score": "log_odds",
                                               "weights_sha256": clf.config["weights_sha256"]})


def realism_scores(features: np.ndarray, real: np.ndarray, k: int = 3) -> np.ndarray:
    """Kynkaanniemi et al. (2019)'s realism score of each row of ``features`` against ``real``
    features: max_i r_i / ||f - phi_i||, over the half of the real rows with the smallest r_i (the
    distance to their k-th nearest real neighbour, themselves excluded)."""
    real = np.asarray(real, np.float64)
    if len(real) <= k:
        raise ValueError(f"realism needs more than k={k} real features, got {len(real)}")
    radii = np.sort(_distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    keep = radii <= np.median(radii)
    real, radii = real[keep], radii[keep]
    dist = _distances(np.asarray(features, np.float64), real)
    return (radii[None, :] / np.maximum(dist, 1e-12)).max(-1)


def _distances(a: np.ndarray, b: np.ndarray, rows: int = 128) -> np.ndarray:
    """Euclidean distances of every row of ``a`` to every row of ``b``, a block of rows at a time:
    the (rows, len(b), dim) differences instead of all of them at once (1.2 GB for the digits'
    1,500 training features), each entry computed exactly as in one call."""
    out = np.empty((len(a), len(b)), np.float64)
    for i in range(0, len(a), rows):
        out[i:i + rows] = np.sqrt(np.maximum(((a[i:i + rows, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    return out


@functools.lru_cache(maxsize=1)
def _digits_real_features() -> tuple[np.ndarray, np.ndarray]:
    from jdistill.data.digits import digits_arrays

    train = digits_arrays("train")
    return digits_oracle_classifier().features(train["image"]), np.asarray(train["label"])


@register("digits_realism")
def digits_realism(k: int = 3) -> Oracle:
    clf = digits_oracle_classifier()
    real, real_labels = _digits_real_features()

    def score(images, labels=None):
        feats = np.asarray(clf.features(images), np.float64)
        if labels is None:
            return realism_scores(feats, real, k)
        labels = np.asarray(labels, np.int64)
        out = np.empty(len(feats), np.float64)
        for c in np.unique(labels):
            rows = labels == c
            out[rows] = realism_scores(feats[rows], real[real_labels == c], k)
        return out

    return Oracle("digits_realism", score, {"oracle": "digits_realism", "score": "realism", "k": int(k),
                                            "real": "digits train split, per class",
                                            "weights_sha256": clf.config["weights_sha256"]})


def _clip_oracle(name: str, model: str, tokenizer: str | None, size: int | None, cache_dir: str | None,
                 scale: str) -> Oracle:
    from jdistill.convert import pretrained
    from jdistill.models import clip_vision, tokenizers

    loaded = pretrained.load_pretrained(model, cache_dir=cache_dir)
    if loaded.family != "clip_model":
        raise ValueError(f"{model}: the {name} oracle needs a CLIPModel folder (text and image towers), "
                         f"found a {loaded.family!r} model")
    tok = tokenizers.load_tokenizer(tokenizer or model)
    module, params = loaded.module, loaded.params
    crop = dict(module.vision)["image_size"]
    size = size or crop

    @jax.jit
    def cosine(pixels, ids, mask):
        return clip_vision.clip_score(module, params, pixels, ids, mask) / 100.0

    def score(images, prompts):
        if prompts is None:
            raise ValueError(f"the {name} oracle scores images against their prompts; none given")
        ids, mask = tokenizers.tokenize(tok, list(prompts))
        cos = cosine(clip_vision.preprocess(images, size, crop), jnp.asarray(ids), jnp.asarray(mask))
        return cos * (100.0 if scale == "clip" else jnp.exp(params["logit_scale"]))

    return Oracle(name, score, {"oracle": name, "model": os.path.abspath(os.fspath(model)),
                                "tokenizer": os.path.abspath(os.fspath(tokenizer or model)), "size": size})


@register("clip_score")
def clip_score(model: str, tokenizer: str | None = None, size: int | None = None, cache_dir: str | None = None):
    return _clip_oracle("clip_score", model, tokenizer, size, cache_dir, "clip")


@register("pickscore")
def pickscore(model: str, tokenizer: str | None = None, size: int | None = None, cache_dir: str | None = None):
    return _clip_oracle("pickscore", model, tokenizer, size, cache_dir, "logit_scale")


def train_digits_oracle(directory=DIGITS_ORACLE_DIR) -> classifier_lib.DigitsClassifier:
    """Train the second digits classifier and write its asset (deterministic from its seed)."""
    clf = classifier_lib.train_digits_classifier(**DIGITS_ORACLE_TRAINING)
    clf.config["role"] = "oracle for adaptive collaboration; not the FD network (jdistill/assets/digits_classifier)"
    classifier_lib.save_classifier(clf, directory)
    return clf


if __name__ == "__main__":
    print(json.dumps(train_digits_oracle().config, indent=1))
