"""Mahalanobis distance to the closest class mean with a tied covariance (Lee et al. 2018)."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.stats import FitStats, precision_matrix


def min_mahalanobis(h: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """minₖ (h−μₖ)ᵀ P (h−μₖ) per row: h (N×D), means (C×D), P (D×D) → float64 (N,).

    Expanded as hᵀPh − 2 hᵀPμₖ + μₖᵀPμₖ (one N×D×D and one N×D×C matmul, in float64).
    """
    h = np.asarray(h, np.float64)
    hp = h @ precision
    mp = means @ precision
    d = np.einsum("nd,nd->n", hp, h)[:, None] - 2.0 * hp @ means.T + np.einsum("cd,cd->c", mp, means)[None, :]
    return d.min(axis=1)


class Mahalanobis(Detector):
    """Score = −minₖ (h−μₖ)ᵀ Σ⁻¹ (h−μₖ) on penultimate features; Σ = tied covariance (1/N).

    Σ⁻¹ is :func:`oodlib.stats.precision_matrix`: the exact inverse of a well-conditioned Σ; a
    singular one (fewer training rows than dimensions, dead features) gets a small ridge, with a
    warning, so that the scores do not depend on rounding.
    """

    name = "mahalanobis"
    requires = ("features",)
    fit_needs = ("moments", "second")

    def fit_stats(self, stats: FitStats, head: Head) -> "Mahalanobis":
        self.means_ = stats.moments.means
        self.precision_ = precision_matrix(stats.moments.tied_covariance(), "Mahalanobis: the tied covariance")
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return -min_mahalanobis(inputs.features, self.means_, self.precision_)
