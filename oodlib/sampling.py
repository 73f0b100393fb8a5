"""Seeded samples of rows that depend on nothing but each row's id.

A row is in the sample of fraction f when ``u(id) < f``, with ``u(id)`` the first 8 bytes of
``blake2b(f"{seed}:{id}")`` read as a number in [0, 1). So the sample is the same whatever the
order, sharding or partitioning of the rows, each worker can draw its part of it from the rows it
holds (no global shuffle, no row count needed), and samples of one seed are nested: the rows of
fraction 0.01 are among those of fraction 0.1. The size is binomial (≈ f·N), not exactly
``round(f·N)``; :func:`sample_mask` tops it up to a minimum with the rows of smallest ``u``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_SCALE = float(2**64)


def unit_hash(ids: Iterable[str], seed: int = 0) -> np.ndarray:
    """``u(id)`` in [0, 1) (float64) of every id under ``seed`` (see the module docstring)."""
    ids = list(ids)
    prefix = f"{int(seed)}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(i).encode(), digest_size=8).digest(), "big") / _SCALE for i in ids),
        dtype=np.float64, count=len(ids),
    )


def sample_mask(u: np.ndarray, fraction: float, minimum: int = 0) -> np.ndarray:
    """Rows in the sample: ``u < fraction`` (every row for ``fraction ≥ 1``), topped up to at least
    ``minimum`` rows (when there are that many) with the rows of smallest ``u``."""
    u = np.asarray(u, np.float64)
    if fraction >= 1.0:
        return np.ones(len(u), bool)
    keep = u < fraction
    if keep.sum() < minimum:
        keep[np.argsort(u, kind="stable")[: min(minimum, len(u))]] = True
    return keep


def id_sample(ids: Iterable[str], fraction: float, seed: int = 0, minimum: int = 0) -> np.ndarray:
    """Mask of the rows of ``ids`` in the sample of ``fraction`` (seeded; see the module docstring)."""
    ids = list(ids)
    if fraction >= 1.0:
        return np.ones(len(ids), bool)
    return sample_mask(unit_hash(ids, seed), fraction, minimum)
