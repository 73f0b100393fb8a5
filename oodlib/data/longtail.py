"""Long-tailed ID training sets (CIFAR-LT / ImageNet-LT) as index lists, and head/tail classes.

* :func:`long_tail_split` — CIFAR-10/100-LT as in the graph-LT paper's code: per class i the first
  nᵢ = ⌊n_max · ρ^(−i/(C−1))⌋ images in dataset order (no shuffle), plus a balanced validation set
  of the next ``val_per_class`` images of every class. Defaults follow that code: ``val_per_class``
  = ⌊n_c / 50⌋ and n_max = n_c − val_per_class, n_c the smallest class size (CIFAR-10: 4900 / 100).
* :func:`read_index_list` — ImageNet-LT style list files (``relative/path.JPEG label`` per line).
* :func:`head_classes` — the first half of the classes by training count (most frequent first).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np



def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Exponential profile: n_k = floor(n_max · ρ^(−k/(C−1))), k = 0..C−1 (class 0 largest)."""
    return [int(n_max * imbalance_ratio ** (-k / (num_classes - 1))) for k in range(num_classes)]


def long_tail_split(
    labels: np.ndarray,
    imbalance_ratio: float = 100.0,
    n_max: int | None = None,
    val_per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic long-tailed train indices and a balanced validation set.

    Args:
        labels: (N,) int class of every image of the balanced source set, classes 0..C−1 (class 0
            becomes the head).
        imbalance_ratio: 1/ρ = n_max / n_min (100 for CIFAR-LT).
        n_max, val_per_class: see the module docstring for the defaults.
    Returns:
        (train_idx, val_idx, counts (C,) training images per class); indices sorted ascending.
    """
    labels = np.asarray(labels, np.int64)
    num_classes = int(labels.max()) + 1
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    smallest = min(len(p) for p in per_class)
    val_per_class = smallest // 50 if val_per_class is None else val_per_class
    n_max = smallest - val_per_class if n_max is None else n_max
    counts = np.asarray(long_tail_counts(n_max, num_classes, imbalance_ratio), np.int64)
    if any(n + val_per_class > len(p) for n, p in zip(counts, per_class)):
        raise ValueError("a class has fewer images than its long-tail count plus the validation share")
    train = np.concatenate([p[:n] for p, n in zip(per_class, counts)])
    val = np.concatenate([p[n : n + val_per_class] for p, n in zip(per_class, counts)])
    return np.sort(train), np.sort(val), counts


def read_index_list(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(relative paths, int64 labels) of a ``path label`` list file (ImageNet_LT_train.txt …)."""
    paths, labels = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rel, label = line.rsplit(maxsplit=1)
            paths.append(rel)
            labels.append(int(label))
    return paths, np.asarray(labels, np.int64)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Training images per class (C,), int64; labels outside [0, C) are ignored."""
    labels = np.asarray(labels, np.int64)
    return np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)


def head_classes(counts: np.ndarray) -> np.ndarray:
    """Boolean mask (C,) of the head: the first ⌊C/2⌋ classes sorted by training count, most
    frequent first (ties: lower class index first)."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    head = np.zeros(len(counts), bool)
    head[order[: len(counts) // 2]] = True
    return head
