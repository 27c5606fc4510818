"""A calibration of adaptive collaboration: the oracle's scores of the student's samples on a
calibration set, what they were computed with, and tau = their k-th percentile.

The reference pipeline calibrated its student at another guidance scale than it sampled with; a
:class:`Calibration` records the student's and the oracle's settings and refuses any other.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jdistill.errors import InvalidArgument, MissingInput


class CalibrationMismatch(InvalidArgument):
    """A calibration file used with other student / oracle settings than it was computed with."""


@dataclasses.dataclass
class Calibration:
    """Oracle scores of the student's samples on a calibration set, and what they were computed with."""

    scores: np.ndarray  # sorted
    settings: dict  # student settings + oracle provenance

    def tau(self, k: float) -> float:
        """The k-th percentile (numpy's linear rule); k = 0 refines nothing, k = 100 everything."""
        if not 0.0 <= k <= 100.0:
            raise InvalidArgument(f"k must be a percentile in [0, 100], got {k}")
        if k == 0:
            return float("-inf")
        if k == 100:
            return float("inf")
        return float(np.percentile(self.scores, k))

    def check(self, settings: dict) -> None:
        diff = {key: (self.settings.get(key), settings.get(key)) for key in set(self.settings) | set(settings)
                if self.settings.get(key) != settings.get(key)}
        if diff:
            said = "; ".join(f"{k}: calibrated with {a!r}, used with {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CalibrationMismatch(f"the calibration does not fit these settings ({said}); calibrate again with "
                                      "`jdistill collab-calibrate` and the inference settings")

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"settings": self.settings, "set_size": len(self.scores),
                       "percentiles": {str(k): self.tau(k) for k in (10, 25, 50, 75, 90)},
                       "scores": [float(s) for s in self.scores]}, f, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> "Calibration":
        if not os.path.isfile(path):
            raise MissingInput(f"no calibration file at {path} (make one with `jdistill collab-calibrate`)")
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "scores" not in data or "settings" not in data:
            raise InvalidArgument(f"{path} is not a calibration file (no scores / settings)")
        return cls(np.sort(np.asarray(data["scores"], np.float32)), data["settings"])
