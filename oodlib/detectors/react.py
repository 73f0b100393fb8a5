"""ReAct (Sun et al. 2021): Energy of the head applied to clipped features min(h, c)."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score
from oodlib.stats import FitStats


def clipped_logits(h: np.ndarray, W: np.ndarray, b: np.ndarray, clip: float | None) -> np.ndarray:
    """Logits W·min(h, clip) + b (N×C, float32); ``clip=None`` means no clipping."""
    h = np.asarray(h, np.float32)
    if clip is not None:
        h = np.minimum(h, np.float32(clip))
    return h @ W.T + b


def activation_percentile(percentile: float, features: np.ndarray | None = None, stats: FitStats | None = None) -> float:
    """ReAct's clip c: the ``percentile``-th percentile of every ID-train activation — exact
    (``np.percentile``) from ``features``, or from the merged sketch of ``stats`` (relative error
    ≤ 4.9e-4)."""
    if features is not None:
        return float(np.percentile(np.asarray(features, np.float32), percentile))
    if stats is None or stats.activations is None:
        raise ValueError("the activation percentile needs an activation sketch (FitStats(activations=True))")
    return stats.activations.percentile(percentile)


class ReAct(Detector):
    """Energy of W·min(h, c) + b, c = the ``percentile``-th percentile of all ID-train activations.

    ``fit`` uses the exact ``np.percentile`` over every entry of h; ``fit_stats`` reads it from the
    merged :class:`~oodlib.stats.ActivationSketch` (relative error ≤ 4.9e-4).
    """

    name = "react"
    requires = ("features",)
    fit_needs = ("activations",)

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = float(percentile)

    def _set(self, head: Head, threshold: float) -> "ReAct":
        self.W_ = np.asarray(head.W, np.float32)
        self.b_ = np.asarray(head.b, np.float32)
        self.threshold_ = float(threshold)
        return self

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "ReAct":
        return self._set(head, activation_percentile(self.percentile, features=features))

    def fit_stats(self, stats: FitStats, head: Head) -> "ReAct":
        return self._set(head, activation_percentile(self.percentile, stats=stats))

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy_score(clipped_logits(inputs.features, self.W_, self.b_, self.threshold_))
