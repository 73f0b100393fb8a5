"""KL-Matching (Hendrycks et al. 2022): KL divergence to the closest typical ID-val posterior."""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from oodlib.detectors._util import class_sums, require_rows
from oodlib.detectors.base import Detector, Head, ScoreInputs

#: stands in for log 0 in a template (a one-hot one): finite, so 0·log 0 = 0 in the product
LOG_ZERO = -1e30


def kl_to_templates(logits: np.ndarray, log_templates: np.ndarray) -> np.ndarray:
    """KL(p ‖ d_k) for every row p = softmax(z) and template k: N×C logits, K×C log-templates → N×K
    float64 (Σ p log p − p·log d_k; a template that is 0 where p > 0 gives ≈ 1e30·p)."""
    logp = log_softmax(np.asarray(logits, np.float64), axis=1)
    p = np.exp(logp)
    return (p * logp).sum(axis=1, keepdims=True) - p @ log_templates.T


class KLM(Detector):
    """Score = −min_k KL(p ‖ d_k), d_k = the mean softmax of the **ID-val** rows *predicted* as k
    (labels unused). A class no val row is predicted as gets a one-hot template (OpenOOD;
    pytorch-ood's ``KLMatching`` skips it and returns +min KL).

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/kl_matching_postprocessor.py>`__
    """

    name = "klm"
    fit_needs = ("bank",)
    fit_split = "val"

    def fit(self, features: np.ndarray, labels: np.ndarray | None, head: Head) -> "KLM":
        features = require_rows(features, "KL-Matching")
        logits = np.asarray(head.logits(features), np.float64)
        n_classes = logits.shape[1]
        p = np.exp(log_softmax(logits, axis=1))
        pred = p.argmax(axis=1)
        sums, counts = class_sums(p, pred, n_classes)
        templates = np.eye(n_classes)
        seen = counts > 0
        templates[seen] = sums[seen] / counts[seen, None]
        self.templates_ = templates
        self._restore()
        return self

    def _restore(self) -> None:
        with np.errstate(divide="ignore"):
            self._log_templates = np.where(self.templates_ > 0, np.log(np.maximum(self.templates_, 1e-300)), LOG_ZERO)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return -kl_to_templates(inputs.logits, self._log_templates).min(axis=1)
