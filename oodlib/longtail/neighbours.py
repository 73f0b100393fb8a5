"""The kNN graph's neighbour statistics (paper Fig. 3c: how many head, tail and OOD neighbours
each node has). Head/tail accuracy is :func:`oodlib.metrics.head_tail_accuracy`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from oodlib.data.longtail import head_classes


def neighbour_stats(edge_index: torch.Tensor | np.ndarray, labels: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """Per node: its group and how many head-ID, tail-ID and OOD neighbours it has (self excluded).

    Args:
        edge_index: undirected graph 2×E (both directions present).
        labels: (N,) class per node, −1 for OOD / outlier nodes.
        counts: (C,) training images per class (defines head/tail).
    Returns:
        DataFrame with columns ``node``, ``label``, ``group`` (head | tail | ood), ``degree``,
        ``n_head``, ``n_tail``, ``n_ood``.
    """
    ei = np.asarray(edge_index.cpu() if isinstance(edge_index, torch.Tensor) else edge_index, np.int64)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    head = head_classes(counts)
    group = np.where(labels < 0, 2, np.where(head[np.clip(labels, 0, None)], 0, 1))
    src, dst = ei[0], ei[1]
    keep = src != dst
    table = np.zeros((n, 3), np.int64)
    np.add.at(table, (src[keep], group[dst[keep]]), 1)
    return pd.DataFrame({
        "node": np.arange(n), "label": labels, "group": np.array(["head", "tail", "ood"])[group],
        "degree": table.sum(1), "n_head": table[:, 0], "n_tail": table[:, 1], "n_ood": table[:, 2],
    })


def neighbour_stats_by_class(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean head/tail/OOD neighbour counts per label (−1 = OOD), as plotted in the paper's Fig. 3c."""
    return stats.groupby("label", as_index=False)[["degree", "n_head", "n_tail", "n_ood"]].mean()
