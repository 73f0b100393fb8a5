"""Helpers shared by several detectors (no detector is registered here)."""
from __future__ import annotations

import numpy as np


def chunks(n: int, size: int = 16384):
    """Slices covering range(n) in pieces of ``size`` rows."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def class_sums(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class row sums (C×D float64) and counts (C,) of x (N×D) grouped by y (N,); rows with
    y < 0 are left out. Summed in float64 chunk by chunk (no copy of x)."""
    y = np.asarray(y, np.int64)
    sums = np.zeros((n_classes, x.shape[1]))
    counts = np.bincount(y[y >= 0], minlength=n_classes)[:n_classes]
    for part in chunks(len(y)):
        yc = y[part]
        order = np.argsort(yc, kind="stable")
        order = order[yc[order] >= 0]
        if len(order):
            classes, starts = np.unique(yc[order], return_index=True)
            sums[classes] += np.add.reduceat(np.asarray(x[part][order], np.float64), starts, axis=0)
    return sums, counts


def predictions(features: np.ndarray, head) -> np.ndarray:
    """argmax of the head's logits per row (N,), chunk by chunk."""
    out = np.empty(len(features), np.int64)
    for part in chunks(len(features)):
        out[part] = np.argmax(head.logits(features[part]), axis=1)
    return out


def require_rows(features: np.ndarray, what: str, split: str = "val") -> np.ndarray:
    """``features`` as an array; an empty one raises a ValueError naming the split to add."""
    features = np.asarray(features)
    if len(features) == 0:
        raise ValueError(f"{what} is fitted on the ID {split} split, which has no rows: give the ID dataset a "
                         f"'{split}' set in the config's data section")
    return features
