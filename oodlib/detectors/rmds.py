"""Relative Mahalanobis distance (Ren et al. 2021): the class-conditional Mahalanobis distance
relative to that of one background Gaussian fitted to all ID-train features."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.stats import FitStats, precision_matrix


class RMDS(Detector):
    """Score = max_k (d₀ − d_k): d_k = (h−μ_k)ᵀΣ⁻¹(h−μ_k) with the class means μ_k (true labels)
    and the tied covariance Σ, d₀ = (h−μ₀)ᵀΣ₀⁻¹(h−μ₀) with the mean and covariance of all ID-train
    features (both 1/N, inverted by :func:`~oodlib.stats.precision_matrix`).

    With x = h − μ₀ and m_k = μ_k − μ₀ the score is xᵀ(Σ₀⁻¹ − Σ⁻¹)x + max_k (2xᵀΣ⁻¹m_k − m_kᵀΣ⁻¹m_k):
    the D×D and D×C matrices are precomputed at fit time (float64). pytorch-ood's ``RMD`` returns
    min_k (d_k − d₀) with unnormalised covariance sums (+1e-6·I), i.e. −score/N.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/rmds_postprocessor.py>`__
    """

    name = "rmds"
    requires = ("features",)
    fit_needs = ("moments", "second")

    def fit_stats(self, stats: FitStats, head: Head) -> "RMDS":
        m = stats.moments
        n = m.counts.sum()
        mean0 = m.sums.sum(axis=0) / n
        cov0 = m.outer / n - np.outer(mean0, mean0)
        precision = precision_matrix(m.tied_covariance(), "RMDS: the tied covariance")
        precision0 = precision_matrix(cov0, "RMDS: the background covariance")
        offsets = m.means - mean0
        linear = offsets @ precision  # C×D: Σ⁻¹m_k
        self.mean_ = mean0
        self.quadratic_ = precision0 - precision
        self.linear_ = 2.0 * linear
        self.offset_ = np.einsum("cd,cd->c", linear, offsets)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        x = np.asarray(inputs.features, np.float64) - self.mean_
        quad = np.einsum("nd,nd->n", x @ self.quadratic_, x)
        return quad + (x @ self.linear_.T - self.offset_).max(axis=1)
