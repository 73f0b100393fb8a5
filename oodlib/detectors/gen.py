"""GEN (Liu et al. 2023): generalized entropy of the M largest softmax probabilities."""
from __future__ import annotations

import numpy as np
from scipy.special import softmax

from oodlib.detectors.base import Detector, ScoreInputs


def top_m(p: np.ndarray, m: int | None) -> np.ndarray:
    """The ``m`` largest entries of each row (unordered), or all of them when m is None or ≥ C."""
    if m is None or m >= p.shape[1]:
        return p
    return np.partition(p, p.shape[1] - m, axis=1)[:, p.shape[1] - m:]


class GEN(Detector):
    """Score = −Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ over the M largest probabilities p = softmax(z).

    Defaults γ = 0.1, M = 100 (OpenOOD; ``M=None`` = every class). pytorch-ood's ``GEN`` clamps p
    to [1e-7, 1 − 1e-7], takes the mean instead of the sum and returns the positive value.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/gen_postprocessor.py>`__
    """

    name = "gen"

    def __init__(self, gamma: float = 0.1, M: int | None = 100) -> None:
        self.gamma = float(gamma)
        self.M = None if M is None else int(M)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        p = top_m(softmax(np.asarray(inputs.logits, np.float64), axis=1), self.M)
        return -(p ** self.gamma * (1.0 - p) ** self.gamma).sum(axis=1)
