"""Class-conditional Gaussian mixture on the penultimate features (pytorch-ood's ``GMM``)."""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from oodlib.detectors._util import chunks
from oodlib.detectors.base import Detector, Head, ScoreInputs


class GMM(Detector):
    """Score = log Σ_k π_k N(h | μ_k, Σ_k): one Gaussian per class (true labels) with its own
    covariance Σ_k (1/n_k, + ``reg``·I) and weight π_k = n_k/N. pytorch-ood's ``GMM`` returns −score.

    The state is C Cholesky factors (C×D×D): fine for CIFAR-sized heads, not for ImageNet's
    (1000 × 2048² float64 = 34 GB), where Mahalanobis/RMDS (a tied Σ) apply.

    :see Implementation: `pytorch-ood 0.4.0 <https://pypi.org/project/pytorch-ood/0.4.0/>`__ ``pytorch_ood/detector/gmm.py``
    """

    name = "gmm"
    requires = ("features",)
    fit_needs = ("bank",)

    def __init__(self, reg: float = 1e-6) -> None:
        self.reg = float(reg)

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "GMM":
        labels = np.asarray(labels, np.int64)
        n, d = features.shape
        classes = np.unique(labels)
        means, inv_chol, log_det, log_weight = [], [], [], []
        for k in classes:
            x = np.asarray(features[labels == k], np.float64)
            mu = x.mean(axis=0)
            cov = (x - mu).T @ (x - mu) / len(x) + self.reg * np.eye(d)
            try:
                chol = np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                raise ValueError(f"GMM: the covariance of class {k} is not positive definite; increase reg ({self.reg})") from None
            means.append(mu)
            inv_chol.append(np.linalg.inv(chol))  # d_k = ‖L⁻¹(h − μ)‖²
            log_det.append(2.0 * np.log(np.diag(chol)).sum())
            log_weight.append(np.log(len(x) / n))
        self.means_ = np.stack(means)
        self.inv_cholesky_ = np.stack(inv_chol)
        self.log_norm_ = np.asarray(log_weight) - 0.5 * (np.asarray(log_det) + d * np.log(2 * np.pi))
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        h = np.asarray(inputs.features, np.float64)
        out = np.empty(len(h))
        for part in chunks(len(h), 4096):
            dist = np.stack([(((h[part] - mu) @ L.T) ** 2).sum(axis=1) for mu, L in zip(self.means_, self.inv_cholesky_)], 1)
            out[part] = logsumexp(self.log_norm_ - 0.5 * dist, axis=1)
        return out
