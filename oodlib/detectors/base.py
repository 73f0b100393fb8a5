"""The detector interface shared by every post-hoc OOD score.

A detector is fitted on ID-train features and the model's linear head, then scores a batch of
stored features/logits. Scores are ID-confidence: **higher = more in-distribution**. Detectors
follow the estimator contract of :mod:`oodlib.estimator` (hyperparameters in ``__init__``,
fitted attributes ending in ``_``, safetensors state, :class:`~oodlib.estimator.NotFittedError`).

Two ways to fit: ``fit(features, labels, head)`` on all rows in memory (library use), or
``fit_stats(stats, head)`` from merged per-batch partials (:class:`oodlib.stats.FitStats`, what
the distributed FIT stage does); both give the same state. ``fit_needs`` says which partials a
detector reads: ``"moments"`` (class counts/sums), ``"second"`` (Σhhᵀ), ``"activations"``
(value sketch) or ``"bank"`` (the features themselves: only ``fit`` works).

``requires`` names the features-table columns the score reads: ``features``, ``logits``, or
the column of an EMBED extra (e.g. ``odin``); the extra's parameters are the detector's
hyperparameters of the same names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from oodlib.estimator import Estimator
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

    def __len__(self) -> int:
        return len(self.logits)


class Detector(Estimator):
    """Base class. Subclasses set ``name``, ``requires`` and ``fit_needs`` and implement
    ``_score`` (and ``fit_stats`` when they have fitted state)."""

    requires: ClassVar[tuple[str, ...]] = ("logits",)
    fit_needs: ClassVar[tuple[str, ...]] = ()
    #: the ID split the detector is fitted on: ``train``, or ``val`` for what is fitted on held-out
    #: data (a temperature by NLL); a non-train split is always fitted with ``fit`` on its rows
    fit_split: ClassVar[str] = "train"
    #: EMBED columns ``fit`` reads besides features and labels (``fit(…, extras={column: values})``,
    #: :class:`oodlib.detectors.columns.ColumnFitted`)
    fit_columns: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.stateless = not cls.fit_needs

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "Detector":
        """Fit on ID-train features h (N×D) and true labels (N,). Returns self.

        The default reduces all rows to :class:`FitStats` and calls :meth:`fit_stats`, so both
        paths give the same state.
        """
        if self.stateless:
            return self
        stats = FitStats.from_batch(
            features, labels, head.W.shape[0], second="second" in self.fit_needs,
            activations="activations" in self.fit_needs,
        )
        return self.fit_stats(stats, head)

    def fit_stats(self, stats: FitStats, head: Head) -> "Detector":
        """Fit from merged ID-train partials (see ``fit_needs``). Returns self."""
        if self.stateless:
            return self
        raise NotImplementedError(f"{type(self).__name__} needs the feature bank itself: call fit(features, labels, head)")

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        """ID-confidence per row, float32 (N,)."""
        self.check_fitted()
        missing = [c for c in self.requires if c not in ("features", "logits") and c not in inputs.extras]
        if missing:
            raise KeyError(f"detector {self.name!r} needs the column(s) {missing} (an EMBED extra)")
        s = np.asarray(self._score(inputs), np.float32)
        if s.shape != (len(inputs),):
            raise RuntimeError(f"detector {self.name!r} returned shape {s.shape} for {len(inputs)} rows")
        return s

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        raise NotImplementedError
