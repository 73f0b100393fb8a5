"""pNML regret (Bibas et al. 2021) of the single last layer, on normalized penultimate features."""
from __future__ import annotations

import numpy as np
from scipy.special import softmax

from oodlib.detectors._util import chunks
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.faiss_index import l2_normalize


class PNML(Detector):
    """Score = −regret, regret = log Σ_k p_k / (p_k + (1 − p_k) p_k^κ) / log C, with ẑ = h/‖h‖₂,
    κ = ẑᵀXẑ / (1 + ẑᵀXẑ), X = pinv(Σ_i ẑ_iẑ_iᵀ) over the ID-train rows and p = softmax(Wẑ + b)
    clamped to [eps, 1 − eps] — pytorch-ood 0.4's ``PNML`` (which returns +regret). The head is
    applied to the *normalized* feature, as in the authors' code; their code also appends a
    constant 1 to ẑ, which pytorch-ood (and this class) does not.

    :see Implementation: `kobybibas/pnml_ood_detection <https://github.com/kobybibas/pnml_ood_detection/blob/0533589/src/score_utils.py>`__
    """

    name = "pnml"
    requires = ("features",)
    fit_needs = ("bank",)

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = float(eps)

    def fit(self, features: np.ndarray, labels: np.ndarray | None, head: Head) -> "PNML":
        gram = np.zeros((features.shape[1],) * 2)
        for part in chunks(len(features)):
            z = l2_normalize(features[part]).astype(np.float64)
            gram += z.T @ z
        self.projector_ = np.linalg.pinv(gram, hermitian=True)
        self.W_, self.b_ = np.asarray(head.W, np.float32), np.asarray(head.b, np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        z = l2_normalize(inputs.features)
        p = np.clip(softmax(np.asarray(z @ self.W_.T + self.b_, np.float64), axis=1), self.eps, 1.0 - self.eps)
        zd = z.astype(np.float64)
        proj = np.einsum("nd,nd->n", zd @ self.projector_, zd)
        kappa = (proj / (1.0 + proj))[:, None]
        regret = np.log((p / (p + (1.0 - p) * p ** kappa)).sum(axis=1)) / np.log(p.shape[1])
        return -regret
