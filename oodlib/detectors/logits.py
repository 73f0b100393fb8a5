"""Logit-based scores: MSP, MaxLogit, Energy (no fitted state)."""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

from oodlib.detectors.base import Detector, ScoreInputs


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy T·logsumexp(f/T) per row (N×C → N), float32."""
    f = np.asarray(logits, np.float64)
    return (temperature * logsumexp(f / temperature, axis=1)).astype(np.float32)


class MSP(Detector):
    """Maximum softmax probability, max_k softmax(f)_k."""

    name = "msp"

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return softmax(np.asarray(inputs.logits, np.float64), axis=1).max(axis=1).astype(np.float32)


class MaxLogit(Detector):
    """Largest logit, max_k f_k."""

    name = "maxlogit"

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return np.asarray(inputs.logits, np.float32).max(axis=1)


class Energy(Detector):
    """Energy score T·logsumexp(f/T) (Liu et al. 2020), T = 1 by default."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy_score(inputs.logits, self.temperature)
