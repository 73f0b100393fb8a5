"""Per-class feature moments as mergeable partial sums.

FIT reduces the ID training features to these statistics batch by batch (Ray Data emits one
partial per batch; the driver merges them), so nothing needs all features in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassMoments:
    """Sufficient statistics of features h (N×D) with labels y in [0, C).

    ``counts`` (C,) int64, ``sums`` (C×D) float64 = Σ_{i: yᵢ=k} hᵢ, and, when ``second`` is
    kept, ``outer`` (D×D) float64 = Σᵢ hᵢ hᵢᵀ over all rows.
    """

    counts: np.ndarray
    sums: np.ndarray
    outer: np.ndarray | None = None

    @classmethod
    def from_batch(cls, h: np.ndarray, y: np.ndarray, num_classes: int, second: bool = False) -> "ClassMoments":
        """Moments of one batch; rows with a label outside [0, C) are an error."""
        h = np.asarray(h, np.float64)
        y = np.asarray(y, np.int64)
        if h.ndim != 2 or len(h) != len(y):
            raise ValueError(f"features must be N×D with one label per row, got {h.shape} and {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
        sums = np.zeros((num_classes, h.shape[1]))
        np.add.at(sums, y, h)
        counts = np.bincount(y, minlength=num_classes).astype(np.int64)
        return cls(counts, sums, h.T @ h if second else None)

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        """Sum of two partials (associative and commutative)."""
        if (self.outer is None) != (other.outer is None):
            raise ValueError("cannot merge partials with and without second moments")
        outer = None if self.outer is None else self.outer + other.outer
        return ClassMoments(self.counts + other.counts, self.sums + other.sums, outer)

    @property
    def means(self) -> np.ndarray:
        """Class means (C×D); a class without rows raises."""
        empty = np.flatnonzero(self.counts == 0)
        if len(empty):
            raise ValueError(f"classes {empty.tolist()} have no training rows")
        return self.sums / self.counts[:, None]

    def tied_covariance(self) -> np.ndarray:
        """Shared (tied) covariance Σ = (1/N) Σₖ Σ_{i∈k} (hᵢ−μₖ)(hᵢ−μₖ)ᵀ, D×D (needs ``outer``)."""
        if self.outer is None:
            raise ValueError("tied covariance needs second moments (second=True)")
        n = self.counts.sum()
        return (self.outer - self.sums.T @ (self.sums / np.maximum(self.counts, 1)[:, None])) / n
