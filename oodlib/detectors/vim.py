"""ViM (Wang et al. 2022) and OpenOOD's Residual: the norm of the feature's component outside the
principal subspace of the ID features, around the origin u = −W⁺b of the head."""
from __future__ import annotations

import numpy as np

from oodlib.detectors._util import chunks, require_rows
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score


def vim_dim(n_features: int) -> int:
    """The authors' principal dimension: 1000 if D ≥ 2048, 512 if D ≥ 768, else D/2."""
    return 1000 if n_features >= 2048 else 512 if n_features >= 768 else n_features // 2


def head_origin(head: Head) -> np.ndarray:
    """u = −W⁺b (D,), the point the head maps to zero logits."""
    return -np.linalg.pinv(np.asarray(head.W, np.float64)) @ np.asarray(head.b, np.float64)


def null_space(features: np.ndarray, origin: np.ndarray, dim: int) -> np.ndarray:
    """The eigenvectors of Σ = mean (h−u)(h−u)ᵀ after the ``dim`` largest eigenvalues: D×(D−dim).

    ``np.linalg.eigh`` in float64 (the authors and OpenOOD use ``eig``, pytorch-ood ``eigh``; the
    spanned subspace, and so every norm below, is the same)."""
    n, d = features.shape
    if not 0 < dim < d:
        raise ValueError(f"the principal dimension must lie in (0, {d}) for {d}-d features, got {dim}")
    if n == 0:
        raise ValueError("no feature rows to fit the principal subspace on")
    cov = np.zeros((d, d))
    for part in chunks(n):
        x = np.asarray(features[part], np.float64) - origin
        cov += x.T @ x
    vals, vecs = np.linalg.eigh(cov / n)
    order = np.argsort(-vals, kind="stable")
    return np.ascontiguousarray(vecs[:, order[dim:]], np.float32)


def residual_norm(features: np.ndarray, origin: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """‖(h − u) B‖₂ per row (float32 GEMM)."""
    x = np.asarray(features, np.float32) - origin
    return np.linalg.norm(x @ basis, axis=1)


class ViM(Detector):
    """Score = logsumexp(z) − α‖(h − u)P⊥‖₂, fitted on ID-train: P⊥ = :func:`null_space` with
    ``dim`` principal directions (None = the authors' rule :func:`vim_dim`; OpenOOD: 256),
    α = mean max-logit / mean ‖(h−u)P⊥‖ over the fitted rows. pytorch-ood's ``ViM`` returns −score.

    :see Implementation: `haoqiwang/vim <https://github.com/haoqiwang/vim/blob/dabf9e5/benchmark.py>`__
    """

    name = "vim"
    requires = ("features", "logits")
    fit_needs = ("bank",)

    def __init__(self, dim: int | None = None) -> None:
        self.dim = None if dim is None else int(dim)

    def fit(self, features: np.ndarray, labels: np.ndarray | None, head: Head) -> "ViM":
        features = np.asarray(features)
        origin = head_origin(head)
        basis = null_space(features, origin, self.dim or vim_dim(features.shape[1]))
        max_logit, vnorm = 0.0, 0.0
        for part in chunks(len(features)):
            max_logit += float(np.asarray(head.logits(features[part]), np.float64).max(axis=1).sum())
            vnorm += float(residual_norm(features[part], origin.astype(np.float32), basis).astype(np.float64).sum())
        self.origin_ = origin.astype(np.float32)
        self.null_space_ = basis
        self.alpha_ = max_logit / vnorm
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        vlogit = self.alpha_ * residual_norm(inputs.features, self.origin_, self.null_space_).astype(np.float64)
        return energy_score(inputs.logits).astype(np.float64) - vlogit


class Residual(Detector):
    """Score = −‖(h − u)P⊥‖₂ with ``dim`` = 512 principal directions fitted on the **ID-val**
    features (as OpenOOD's ``residual`` does). pytorch-ood has no Residual.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/residual_postprocessor.py>`__
    """

    name = "residual"
    requires = ("features",)
    fit_needs = ("bank",)
    fit_split = "val"

    def __init__(self, dim: int = 512) -> None:
        self.dim = int(dim)

    @classmethod
    def contract_variants(cls) -> list[dict]:
        return [{"dim": 6}]

    def fit(self, features: np.ndarray, labels: np.ndarray | None, head: Head) -> "Residual":
        origin = head_origin(head)
        self.null_space_ = null_space(require_rows(features, "Residual"), origin, self.dim)
        self.origin_ = origin.astype(np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return -residual_norm(inputs.features, self.origin_, self.null_space_)
