"""Detectors fitted on EMBED columns (intermediate-layer statistics, AdaSCALE's perturbation terms)
rather than on the penultimate features alone.

Such a detector names the columns its fit reads in ``fit_columns`` and is fitted with
``fit(features, labels, head, extras={column: values})`` on the rows of its ``fit_split``. A
column over several layers comes with ``<column>_sizes`` (each layer's width, the same in every
row; see :mod:`oodlib.layers`), so the detector learns the layout from the data; scoring checks
that the layout is the fitted one.
"""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, Head


class ColumnFitted(Detector):
    """Base of the detectors fitted on EMBED columns; subclasses implement ``_fit``."""

    fit_needs = ("bank",)  # fitted on the rows themselves (FIT loads the split), never from partial sums

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head, extras: dict | None = None) -> "ColumnFitted":
        """Fit on the rows' features h (N×D), labels (N,) and ``extras`` (the columns of
        ``fit_columns`` of the same rows). Returns self."""
        missing = [c for c in self.fit_columns if extras is None or c not in extras]
        if missing:
            raise KeyError(f"detector {self.name!r} is fitted on its EMBED column(s) {missing}: "
                           f"call fit(features, labels, head, extras={{column: values}}) with those columns of the rows")
        cols = {c: np.asarray(extras[c]) for c in self.fit_columns}
        n = len(labels)
        if any(len(v) != n for v in cols.values()) or len(features) != n:
            raise ValueError(f"detector {self.name!r}: {n} labels but column lengths "
                             f"{ {c: len(v) for c, v in cols.items()} } and {len(features)} feature rows")
        return self._fit(np.asarray(features, np.float32), np.asarray(labels, np.int64), head, cols)

    def _fit(self, features: np.ndarray, labels: np.ndarray, head: Head, extras: dict[str, np.ndarray]) -> "ColumnFitted":
        raise NotImplementedError


def layer_blocks(values: np.ndarray, sizes: np.ndarray, detector: str, expected: np.ndarray | None = None) -> list[np.ndarray]:
    """Split a concatenated per-layer column (N×W) by its ``_sizes`` column (N×L, one layout for
    every row) into L blocks (N×Wₗ, float32). ``expected``: the fitted layout it must equal."""
    values = np.asarray(values, np.float32)
    sizes = np.asarray(sizes)
    if values.ndim != 2 or sizes.ndim != 2 or len(values) != len(sizes):
        raise ValueError(f"detector {detector!r}: a per-layer column must be N×W with an N×L sizes column, "
                         f"got {values.shape} and {sizes.shape}")
    widths = sizes[0].astype(np.int64) if len(sizes) else np.asarray(expected if expected is not None else [values.shape[1]])
    if len(sizes) and (not np.all(sizes == sizes[0]) or widths.sum() != values.shape[1] or (widths <= 0).any()):
        raise ValueError(f"detector {detector!r}: the rows' layer layout is inconsistent (sizes {np.unique(sizes, axis=0).tolist()} "
                         f"for {values.shape[1]} values)")
    if expected is not None and not np.array_equal(widths, np.asarray(expected)):
        raise ValueError(f"detector {detector!r}: the rows' layer widths {widths.tolist()} differ from the fitted "
                         f"{np.asarray(expected).tolist()} (EMBED computed them with other layers or another model)")
    return np.split(values, np.cumsum(widths)[:-1], axis=1)


def per_layer(value, n_layers: int, what: str, detector: str) -> np.ndarray:
    """A hyperparameter given once for every layer or as one value per layer → (L,) float64."""
    v = np.atleast_1d(np.asarray(value, np.float64))
    if v.size == 1:
        return np.full(n_layers, v[0])
    if v.size != n_layers:
        raise ValueError(f"detector {detector!r}: {v.size} values of `{what}` for {n_layers} layers "
                         f"(give one value for all layers or one per layer)")
    return v


def random_layer_columns(column: str, widths, n: int, rng: np.random.Generator, low: float = 0.0) -> dict[str, np.ndarray]:
    """Random rows of a per-layer column and its sizes (for the contract tests)."""
    values = rng.uniform(low, 1.0, (n, int(sum(widths)))).astype(np.float32)
    return {column: values, f"{column}_sizes": np.tile(np.asarray(widths, np.float32), (n, 1))}


def as_tuple(value, cast=str, scalar: bool = False):
    """A list hyperparameter as a tuple of ``cast`` values: a list/tuple, or a comma-separated
    string (what a config's scalar ``params`` can hold: ``"layer1,layer2"``). None stays None; a
    single number stays a number when ``scalar`` (one value for every layer), else a 1-tuple."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
        if scalar and len(value) == 1:
            return cast(value[0])
    if isinstance(value, (list, tuple)):
        return tuple(cast(v) for v in value)
    return cast(value) if scalar else (cast(value),)
