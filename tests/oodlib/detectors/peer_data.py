"""Small shared problems for the detector tests (peer parity, layer statistics)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from oodlib.detectors import Head, ScoreInputs


def problem(seed: int = 0, n_classes: int = 6, dim: int = 16, per_class: int = 40, n_test: int = 60):
    """(ID-train features (post-ReLU, class-structured), labels, head, test features), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 2, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    h = np.maximum(centres[y] + rng.normal(0, 0.5, (len(y), dim)), 0).astype(np.float32)
    W = rng.normal(0, 0.5, (n_classes, dim)).astype(np.float32)
    b = rng.normal(0, 0.1, n_classes).astype(np.float32)
    test = np.maximum(rng.normal(0.8, 1.0, (n_test, dim)), 0).astype(np.float32)
    return h, y, Head(W, b), test


def separable(seed: int = 0, n_classes: int = 10, dim: int = 16, per_class: int = 40):
    """A problem whose head classifies every training row correctly (as SHE/OpenMax peers need):
    (train features, labels, head, test features whose predictions cover every class)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_classes, dim))
    centres[np.arange(n_classes), np.arange(n_classes)] = 4.0
    centres += rng.uniform(0, 0.5, centres.shape)
    W = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    head = Head(W, rng.normal(0, 0.05, n_classes).astype(np.float32))

    def rows(labels, noise):
        return np.maximum(centres[labels] + rng.normal(0, noise, (len(labels), dim)), 0).astype(np.float32)

    y = np.repeat(np.arange(n_classes), per_class)
    h = rows(y, 0.6)
    keep = head.logits(h).argmax(1) == y
    test = np.concatenate([rows(np.arange(n_classes).repeat(3), 1.0), np.abs(rng.normal(1.0, 1.5, (20, dim)))]).astype(np.float32)
    assert set(head.logits(test).argmax(1)) == set(range(n_classes))
    return h[keep], y[keep], head, test


def inputs(h: np.ndarray, head: Head) -> ScoreInputs:
    return ScoreInputs(h, head.logits(h), {})


def linear(head: Head) -> torch.nn.Linear:
    """The head as a torch Linear layer."""
    lin = torch.nn.Linear(head.W.shape[1], head.W.shape[0])
    lin.weight.data, lin.bias.data = torch.from_numpy(head.W.copy()), torch.from_numpy(head.b.copy())
    return lin


def model(head: Head) -> torch.nn.Module:
    """A model whose input is the feature and whose only layer is ``fc`` (the head)."""
    return torch.nn.Sequential(OrderedDict(fc=linear(head)))


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def images(n: int, seed: int, channels: int = 3, size: int = 64, scale: float = 1.0) -> torch.Tensor:
    """Seeded N(0, scale²) images [n, channels, size, size]."""
    return scale * torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
