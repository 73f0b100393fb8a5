"""fDBD (Liu & Qin 2024): feature distance to the decision boundaries of the linear head."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.stats import FitStats


def weight_distances(W: np.ndarray) -> np.ndarray:
    """‖w_p − w_c‖₂ for every pair of head rows (C×C, float64), diagonal set to 1 (as OpenOOD)."""
    W = np.asarray(W, np.float64)
    sq = (W * W).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * W @ W.T, 0.0))
    np.fill_diagonal(d, 1.0)
    return d


class FDBD(Detector):
    """Score = Σ_{k≠ŷ} |z_ŷ − z_k| / ‖w_ŷ − w_k‖₂, divided by ‖h − μ‖₂ (μ = the ID-train mean;
    ``distance_as_normalizer=False``: by ‖h‖₂, OpenOOD's other APS option). OpenOOD sums over k;
    pytorch-ood's ``fDBD`` averages (÷(C−1)) and returns −score.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/fdbd_postprocessor.py>`__
    """

    name = "fdbd"
    requires = ("features", "logits")
    fit_needs = ("moments",)

    def __init__(self, distance_as_normalizer: bool = True) -> None:
        self.distance_as_normalizer = bool(distance_as_normalizer)

    def fit_stats(self, stats: FitStats, head: Head) -> "FDBD":
        m = stats.moments
        self.mean_ = np.asarray(m.sums.sum(axis=0) / m.counts.sum(), np.float32)
        self.inv_distance_ = (1.0 / weight_distances(head.W)).astype(np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        z = np.asarray(inputs.logits, np.float32)
        pred = np.argmax(z, axis=1)
        top = z[np.arange(len(z)), pred]
        boundary = np.einsum("nc,nc->n", np.abs(top[:, None] - z), self.inv_distance_[pred])
        h = np.asarray(inputs.features, np.float32)
        norm = np.linalg.norm(h - self.mean_ if self.distance_as_normalizer else h, axis=1)
        return boundary / norm
