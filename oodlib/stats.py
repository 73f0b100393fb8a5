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


#: Bits of the order-preserving float32 key kept per histogram bin (see :class:`ActivationSketch`).
SKETCH_BITS = 20


def _order_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys with the same order (negative floats flipped)."""
    u = np.ascontiguousarray(values, np.float32).reshape(-1).view(np.uint32)
    return np.where(u >> 31, ~u, u | np.uint32(0x80000000))


def _keys_to_values(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_order_keys` (uint32 keys → float64 values)."""
    keys = np.asarray(keys, np.uint32)
    u = np.where(keys >> 31, keys & np.uint32(0x7FFFFFFF), ~keys)
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


@dataclass
class ActivationSketch:
    """Mergeable histogram of activation values for percentiles over huge sets (ReAct's c).

    Values are binned by the top ``bits`` bits of an order-preserving float32 key (sign,
    8 exponent bits, ``bits − 9`` mantissa bits), so every bin spans a relative width of at most
    2^-(bits−9) (4.9e-4 for the default 20 bits). Only non-empty bins are stored: ``bins``
    (uint32, sorted) and ``counts`` (int64). :meth:`percentile` follows ``np.percentile``'s
    linear rule, with each order statistic placed uniformly inside its bin, so
    |sketch − exact| ≤ bin width ≤ 2^-(bits−9)·|value| (zeros from ReLU are off by < 1e-37).
    """

    bins: np.ndarray
    counts: np.ndarray
    bits: int = SKETCH_BITS

    @classmethod
    def from_values(cls, values: np.ndarray, bits: int = SKETCH_BITS) -> "ActivationSketch":
        """Sketch of every entry of ``values`` (any shape; NaNs are an error)."""
        values = np.asarray(values, np.float32)
        if np.isnan(values).any():
            raise ValueError("activations contain NaN")
        bins, counts = np.unique(_order_keys(values) >> np.uint32(32 - bits), return_counts=True)
        return cls(bins.astype(np.uint32), counts.astype(np.int64), bits)

    def merge(self, other: "ActivationSketch") -> "ActivationSketch":
        """Sum of two sketches (associative and commutative)."""
        if self.bits != other.bits:
            raise ValueError(f"cannot merge sketches with {self.bits} and {other.bits} bits")
        bins, inverse = np.unique(np.concatenate([self.bins, other.bins]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([self.counts, other.counts]), minlength=len(bins))
        return ActivationSketch(bins.astype(np.uint32), counts.astype(np.int64), self.bits)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _order_statistic(self, index: np.ndarray) -> np.ndarray:
        """Approximate sorted values at 0-based ``index`` (uniform placement inside each bin)."""
        cum = np.cumsum(self.counts)
        b = np.searchsorted(cum, index, side="right")
        within = index - (cum[b] - self.counts[b])
        shift = np.uint32(32 - self.bits)
        lo = _keys_to_values(self.bins[b] << shift)
        hi = _keys_to_values((self.bins[b] << shift) | np.uint32((1 << (32 - self.bits)) - 1))
        return lo + (within + 0.5) / self.counts[b] * (hi - lo)

    def percentile(self, q: float) -> float:
        """Approximate ``np.percentile(values, q)`` (linear interpolation), q in [0, 100]."""
        n = self.total
        if n == 0:
            raise ValueError("empty sketch")
        pos = q / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        vals = self._order_statistic(np.array([lo, min(lo + 1, n - 1)]))
        return float(vals[0] + (pos - lo) * (vals[1] - vals[0]))


@dataclass
class FitStats:
    """Everything FIT reduces from ID-train features, as mergeable partials.

    ``moments``: class counts/sums (and Σhhᵀ when ``second``); ``activations``: a sketch of all
    entries of h (ReAct's percentile), or None when no detector needs it.
    """

    moments: ClassMoments
    activations: ActivationSketch | None = None

    @classmethod
    def from_batch(
        cls, h: np.ndarray, y: np.ndarray, num_classes: int, second: bool = False, activations: bool = False
    ) -> "FitStats":
        """Partial statistics of one batch of features h (N×D) with labels y (N,)."""
        sketch = ActivationSketch.from_values(h) if activations else None
        return cls(ClassMoments.from_batch(h, y, num_classes, second=second), sketch)

    def merge(self, other: "FitStats") -> "FitStats":
        if (self.activations is None) != (other.activations is None):
            raise ValueError("cannot merge partials with and without activation sketches")
        sketch = None if self.activations is None else self.activations.merge(other.activations)
        return FitStats(self.moments.merge(other.moments), sketch)


#: a covariance whose eigenvalues span more than this ratio is treated as singular
MAX_CONDITION = 1e8
#: the ridge then added, relative to the mean eigenvalue (tr Σ / D)
RIDGE = 1e-6


def precision_matrix(cov: np.ndarray, what: str = "covariance") -> np.ndarray:
    """Σ⁻¹ (D×D, float64) of a symmetric PSD covariance, stable when Σ is singular.

    Well-conditioned Σ (λ_max/λ_min ≤ :data:`MAX_CONDITION`): the exact inverse. Otherwise — fewer
    rows than dimensions, dead (always-zero) features — Σ + λI with λ = :data:`RIDGE`·tr(Σ)/D is
    inverted and a ``RuntimeWarning`` says so: the pseudo-inverse of a singular Σ lets rounding
    decide which near-zero eigenvalues are inverted (scores then differ by orders of magnitude
    between two summation orders), while the ridge bounds the condition number at ~1/RIDGE.
    """
    import warnings

    cov = np.asarray(cov, np.float64)
    cov = (cov + cov.T) / 2
    w, v = np.linalg.eigh(cov)
    top = max(float(w[-1]), 0.0)
    if top == 0.0:
        raise ValueError(f"{what} is zero: every feature is constant")
    if w[0] * MAX_CONDITION < top:
        ridge = RIDGE * float(np.trace(cov)) / len(cov)
        rank = int((w > top * len(cov) * np.finfo(np.float64).eps).sum())
        warnings.warn(f"{what} is singular or ill-conditioned (rank {rank} of {len(cov)}, λ_min/λ_max = "
                      f"{max(w[0], 0) / top:.1e}); adding a ridge {ridge:.3g}·I", RuntimeWarning, stacklevel=2)
        w = np.maximum(w, 0.0) + ridge
    return (v / w) @ v.T
