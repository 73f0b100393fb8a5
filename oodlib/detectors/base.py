"""The detector interface shared by every post-hoc OOD score.

A detector is fitted on ID-train features and the model's linear head, then scores a batch of
stored features/logits. Scores are ID-confidence: **higher = more in-distribution**.
Fitted state is a dict of NumPy arrays (saved as npz, never pickled).

Two ways to fit: ``fit(features, labels, head)`` on all rows in memory (library use), or
``fit_stats(stats, head)`` from merged per-batch partials (:class:`oodlib.stats.FitStats`, what
the distributed FIT stage does). ``fit_needs`` says which partials a detector reads:
``"moments"`` (class counts/sums), ``"second"`` (Σhhᵀ), ``"activations"`` (value sketch) or
``"bank"`` (the features themselves: only ``fit`` works).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from oodlib.stats import FitStats


@dataclass(frozen=True)
class Head:
    """The linear head: ``logits = h @ W.T + b``; W (C×D), b (C,)."""

    W: np.ndarray
    b: np.ndarray

    def logits(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h, np.float32) @ self.W.T + self.b


@dataclass
class ScoreInputs:
    """What SCORE hands a detector for N rows: ``features`` h (N×D), ``logits`` (N×C),
    and per-image extras computed in EMBED (e.g. ``odin`` (N,)), keyed by column name."""

    features: np.ndarray
    logits: np.ndarray
    extras: dict[str, np.ndarray]


class Detector:
    """Base class. Subclasses set ``name`` and ``requires`` and implement ``score``.

    ``requires`` names the features-table columns the score reads (``features``, ``logits``,
    or an extra such as ``odin``); ``fit`` is a no-op for detectors without fitted state.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    fit_needs: ClassVar[tuple[str, ...]] = ()

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "Detector":
        """Fit on ID-train features h (N×D) and true labels (N,). Returns self.

        The default reduces all rows to :class:`FitStats` and calls :meth:`fit_stats`, so both
        paths give the same state.
        """
        if not self.fit_needs:
            return self
        stats = FitStats.from_batch(
            features, labels, head.W.shape[0], second="second" in self.fit_needs,
            activations="activations" in self.fit_needs,
        )
        return self.fit_stats(stats, head)

    def fit_stats(self, stats: FitStats, head: Head) -> "Detector":
        """Fit from merged ID-train partials (see ``fit_needs``). Returns self."""
        return self

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """ID-confidence per row, float32 (N,)."""
        raise NotImplementedError

    def params(self) -> dict[str, float | int | str | bool]:
        """Hyperparameters (logged to MLflow)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Fitted arrays (saved as npz)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "Detector":
        return self
