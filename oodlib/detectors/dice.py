"""DICE (Sun & Li 2022): sparsified head from contribution V = W ⊙ mean(h); DICE+ReAct."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score
from oodlib.detectors.react import ReAct, clipped_logits
from oodlib.stats import FitStats


def dice_mask(W: np.ndarray, mean_h: np.ndarray, p: float) -> np.ndarray:
    """Keep-mask (C×D bool) of V = W ⊙ mean_h: entries with V > np.percentile(V, p) over all C·D."""
    V = np.asarray(W, np.float32) * np.asarray(mean_h, np.float32)[None, :]
    return V > np.percentile(V, p)


class DICE(Detector):
    """Energy of (W ⊙ M) h + b; mean(h) over all ID-train rows (class-agnostic), p = 90."""

    name = "dice"
    requires = ("features",)
    fit_needs = ("moments",)

    def __init__(self, p: float = 90.0) -> None:
        self.p = float(p)
        self.mean: np.ndarray | None = None
        self.W: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self.masked_W: np.ndarray | None = None

    def _prepare(self, W: np.ndarray, b: np.ndarray, mean: np.ndarray) -> None:
        self.W, self.b = np.asarray(W, np.float32), np.asarray(b, np.float32)
        self.mean = np.asarray(mean, np.float32)
        self.masked_W = np.where(dice_mask(self.W, self.mean, self.p), self.W, np.float32(0))

    def fit_stats(self, stats: FitStats, head: Head) -> "DICE":
        m = stats.moments
        self._prepare(head.W, head.b, m.sums.sum(axis=0) / m.counts.sum())
        return self

    def _clip(self) -> float | None:
        return None

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy_score(clipped_logits(inputs.features, self.masked_W, self.b, self._clip()))

    def params(self) -> dict:
        return {"p": self.p}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "W": self.W, "b": self.b}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "DICE":
        self._prepare(state["W"], state["b"], state["mean"])
        return self


class DICEReAct(DICE):
    """DICE applied to clipped features min(h, c), c = ReAct's ID-train activation percentile.

    The DICE mask uses the mean of the unclipped ID-train features (as DICE's code does).
    """

    name = "dice_react"
    fit_needs = ("moments", "activations")

    def __init__(self, p: float = 90.0, percentile: float = 90.0) -> None:
        super().__init__(p)
        self.react = ReAct(percentile)

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "DICEReAct":
        DICE.fit_stats(self, FitStats.from_batch(features, labels, head.W.shape[0]), head)
        self.react.fit(features, labels, head)  # exact percentile
        return self

    def fit_stats(self, stats: FitStats, head: Head) -> "DICEReAct":
        super().fit_stats(stats, head)
        self.react.fit_stats(stats, head)
        return self

    def _clip(self) -> float | None:
        return self.react.threshold

    def params(self) -> dict:
        return {"p": self.p, "percentile": self.react.percentile}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**super().state_dict(), "threshold": np.float64(self.react.threshold)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "DICEReAct":
        super().load_state_dict(state)
        self.react.load_state_dict(state)
        return self
