"""Long-tail profiles, splits, head/tail accuracy and neighbour statistics on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from oodlib.data.longtail import (
    class_counts,
    head_classes,
    long_tail_counts,
    long_tail_split,
    read_index_list,
)
from oodlib.longtail.neighbours import neighbour_stats, neighbour_stats_by_class
from oodlib.metrics import head_tail_accuracy


def test_cifar10_lt_profile_counts():
    # n_i = floor(5000 · 0.01^(i/9)) — the standard CIFAR-10-LT (ρ = 100) class sizes
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(4900, 10, 100)[-1] == 49


def test_long_tail_split_takes_first_images_and_a_balanced_val():
    labels = np.tile(np.arange(4), 100)  # 100 images per class, interleaved
    train, val, counts = long_tail_split(labels, imbalance_ratio=10)
    assert counts.tolist() == long_tail_counts(98, 4, 10) == [98, 45, 21, 9]
    assert np.bincount(labels[train]).tolist() == counts.tolist()
    assert np.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        assert set(train[labels[train] == c]) == set(idx[:n])       # first n_c, no shuffle
        assert set(val[labels[val] == c]) == set(idx[n : n + 2])     # the next ones
    assert not set(train) & set(val)
    with pytest.raises(ValueError):
        long_tail_split(labels, imbalance_ratio=10, n_max=100, val_per_class=2)


def test_head_classes_and_counts():
    assert class_counts(np.array([0, 0, 2, -1, 5]), 3).tolist() == [2, 0, 1]
    assert head_classes(np.array([5, 50, 20, 20, 1])).tolist() == [False, True, True, False, False]


def test_head_tail_accuracy_hand_case():
    counts = np.array([300, 50, 10, 5])  # head = {0, 1}; many = {0}, medium = {1}, few = {2, 3}
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, -1])
    pred = np.array([0, 0, 1, 0, 2, 0, 0, 0, 3])
    acc = head_tail_accuracy(labels, pred, counts)
    assert acc["acc"] == 4 / 8 and acc["acc_head"] == 3 / 4 and acc["acc_tail"] == 1 / 4
    assert acc["acc_many"] == 1.0 and acc["acc_medium"] == 0.5 and acc["acc_few"] == 0.25


def test_neighbour_stats_hand_graph():
    # nodes: 0 head(class 0), 1 head(class 0), 2 tail(class 1), 3 OOD; edges 0-1, 0-2, 2-3, 1-3 + self-loops
    und = [(0, 1), (0, 2), (2, 3), (1, 3)]
    edges = [(a, b) for a, b in und] + [(b, a) for a, b in und] + [(i, i) for i in range(4)]
    stats = neighbour_stats(np.array(edges).T, np.array([0, 0, 1, -1]), counts=np.array([10, 2]))
    assert stats["group"].tolist() == ["head", "head", "tail", "ood"]
    assert stats[["n_head", "n_tail", "n_ood"]].values.tolist() == [[1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 1, 0]]
    assert stats["degree"].tolist() == [2, 2, 2, 2]
    by_class = neighbour_stats_by_class(stats)
    assert by_class["label"].tolist() == [-1, 0, 1]
    assert by_class.loc[by_class.label == 0, "n_head"].item() == 1.0


def test_read_index_list(tmp_path):
    f = tmp_path / "ImageNet_LT_train.txt"
    f.write_text("train/n01440764/a.JPEG 0\ntrain/n01443537/b c.JPEG 1\n\n")
    paths, labels = read_index_list(f)
    assert paths == ["train/n01440764/a.JPEG", "train/n01443537/b c.JPEG"] and labels.tolist() == [0, 1]
