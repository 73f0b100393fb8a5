"""Softmax entropy: the negative Shannon entropy of the predicted distribution."""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from oodlib.detectors.base import Detector, ScoreInputs


class Entropy(Detector):
    """Score = Σ_k p_k log p_k = −H(p), p = softmax(z) (0·log 0 = 0; from log-softmax, no clipping).

    OpenOOD has no postprocessor for it; pytorch-ood's ``Entropy`` returns +H after clipping p to
    [1e-7, 1].

    :see Implementation: `pytorch-ood 0.4.0 <https://pypi.org/project/pytorch-ood/0.4.0/>`__ ``pytorch_ood/detector/entropy.py``
    """

    name = "entropy"

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        logp = log_softmax(np.asarray(inputs.logits, np.float64), axis=1)
        return (np.exp(logp) * logp).sum(axis=1)
