"""NCI (Liu & Qin 2025): alignment of the centred feature with the predicted class's weight
vector, plus an L1 feature-norm term (neural-collapse inspired)."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.stats import FitStats


class NCI(Detector):
    """Score = w_ŷ·(h − μ) / ‖h − μ‖₂ + α‖h‖₁, μ = the ID-train feature mean, w_ŷ = the head's
    weight row (no bias) of the predicted class, α = 1e-4 (OpenOOD; pytorch-ood: α = 0 and −score).

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/nci_postprocessor.py>`__
    """

    name = "nci"
    requires = ("features", "logits")
    fit_needs = ("moments",)

    def __init__(self, alpha: float = 1e-4) -> None:
        self.alpha = float(alpha)

    def fit_stats(self, stats: FitStats, head: Head) -> "NCI":
        m = stats.moments
        self.W_ = np.asarray(head.W, np.float32)
        self.mean_ = np.asarray(m.sums.sum(axis=0) / m.counts.sum(), np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        h = np.asarray(inputs.features, np.float32)
        centred = h - self.mean_
        pred = np.argmax(inputs.logits, axis=1)
        cos = np.einsum("nd,nd->n", self.W_[pred], centred) / np.linalg.norm(centred, axis=1)
        return cos + self.alpha * np.abs(h).sum(axis=1)
