"""DICE (Sun & Li 2022): sparsified head from contribution V = W ⊙ mean(h); DICE+ReAct."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score
from oodlib.detectors.react import activation_percentile, clipped_logits
from oodlib.stats import FitStats


def dice_mask(W: np.ndarray, mean_h: np.ndarray, p: float) -> np.ndarray:
    """Keep-mask (C×D bool) of V = W ⊙ mean_h: entries with V > np.percentile(V, p) over all C·D."""
    V = np.asarray(W, np.float32) * np.asarray(mean_h, np.float32)[None, :]
    return V > np.percentile(V, p)


class DICE(Detector):
    """Energy of (W ⊙ M) h + b; mean(h) over all ID-train rows (class-agnostic), p = 90."""

    name = "dice"
    requires = ("features",)
    fit_needs = ("moments",)

    def __init__(self, p: float = 90.0) -> None:
        self.p = float(p)

    def fit_stats(self, stats: FitStats, head: Head) -> "DICE":
        m = stats.moments
        self.W_, self.b_ = np.asarray(head.W, np.float32), np.asarray(head.b, np.float32)
        self.mean_ = np.asarray(m.sums.sum(axis=0) / m.counts.sum(), np.float32)
        self._restore()
        return self

    def _restore(self) -> None:
        self._masked_W = np.where(dice_mask(self.W_, self.mean_, self.p), self.W_, np.float32(0))

    def _clip(self) -> float | None:
        return None

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy_score(clipped_logits(inputs.features, self._masked_W, self.b_, self._clip()))


class DICEReAct(DICE):
    """DICE applied to clipped features min(h, c), c = ReAct's ID-train activation percentile.

    The DICE mask uses the mean of the unclipped ID-train features (as DICE's code does).
    """

    name = "dice_react"
    fit_needs = ("moments", "activations")

    def __init__(self, p: float = 90.0, percentile: float = 90.0) -> None:
        super().__init__(p)
        self.percentile = float(percentile)

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "DICEReAct":
        DICE.fit_stats(self, FitStats.from_batch(features, labels, head.W.shape[0]), head)
        self.threshold_ = activation_percentile(self.percentile, features=features)  # exact percentile
        return self

    def fit_stats(self, stats: FitStats, head: Head) -> "DICEReAct":
        super().fit_stats(stats, head)
        self.threshold_ = activation_percentile(self.percentile, stats=stats)
        return self

    def _clip(self) -> float | None:
        return self.threshold_
