"""ASH (Djurisic et al. 2023): prune the pooled feature to its top activations, reshape them
(ASH-P keeps, ASH-B binarizes, ASH-S scales) and score the energy of the recomputed logits.

As in OpenOOD's ``ASHNet`` and the authors' ResNet-50 code, ASH acts on the pooled penultimate
feature h (B×D, viewed as B×D×1×1), so it runs on stored features. Ties at the top-k boundary are
broken by ``torch.topk``, like both peers.
"""
from __future__ import annotations

import numpy as np
import torch

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score
from oodlib.stats import FitStats


def keep_count(n: int, percentile: float) -> int:
    """k = n − round(n·P/100): how many activations survive pruning at percentile P (NumPy's
    round-half-to-even, as in the official code)."""
    k = n - int(np.round(n * percentile / 100.0))
    if k < 1:
        raise ValueError(f"percentile {percentile} keeps no activation of {n}")
    return k


def top_k(h: np.ndarray, percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h as a float32 tensor, top-k values, their indices) per row, k = :func:`keep_count`."""
    t = torch.from_numpy(np.array(h, np.float32, order="C"))  # a copy: stored features may be read-only
    v, i = torch.topk(t, keep_count(t.shape[1], percentile), dim=1)
    return t, v, i


def ash(h: np.ndarray, percentile: float, variant: str) -> torch.Tensor:
    """ASH-shaped features (N×D float32 tensor): ``"p"`` keeps the top-k values, ``"b"`` sets each
    to Σh/k, ``"s"`` keeps them times exp(Σh / Σtop-k); everything else is zero."""
    t, v, i = top_k(h, percentile)
    s1 = t.sum(dim=1)
    if variant == "b":
        v = (s1 / v.shape[1]).unsqueeze(1).expand(v.shape)
    pruned = torch.zeros_like(t).scatter_(1, i, v)
    if variant == "s":
        pruned = pruned * torch.exp(s1 / pruned.sum(dim=1)).unsqueeze(1)
    return pruned


class _ASH(Detector):
    """Energy of W·ASH(h) + b. ``percentile`` P in percent (pytorch-ood takes a fraction)."""

    requires = ("features",)
    fit_needs = ("moments",)  # nothing is fitted but the head
    variant: str

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = float(percentile)

    def fit_stats(self, stats: FitStats, head: Head) -> "_ASH":
        self.W_, self.b_ = np.asarray(head.W, np.float32), np.asarray(head.b, np.float32)
        self._restore()
        return self

    def _restore(self) -> None:
        self._W, self._b = torch.from_numpy(self.W_), torch.from_numpy(self.b_)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        logits = ash(inputs.features, self.percentile, self.variant) @ self._W.T + self._b
        return energy_score(logits.numpy())


class ASHP(_ASH):
    """ASH-P: prune the bottom P% of h, keep the rest. P = 90 (the authors' ImageNet setting).

    :see Implementation: `andrijazz/ash <https://github.com/andrijazz/ash/blob/0528fd2/ash.py>`__
    """

    name = "ash_p"
    variant = "p"


class ASHB(_ASH):
    """ASH-B: prune the bottom P% of h, set every kept value to Σh/k. P = 90 (OpenOOD's ``ash``).

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/networks/ash_net.py>`__
    """

    name = "ash_b"
    variant = "b"


class ASHS(_ASH):
    """ASH-S: prune the bottom P% of h, scale the kept values by exp(s1/s2) (s1 = Σh before, s2 =
    after pruning). P = 90 for ImageNet ResNet-50 (authors' ``ash_s@90``; CIFAR DenseNet: 95).

    :see Implementation: `andrijazz/ash <https://github.com/andrijazz/ash/blob/0528fd2/ash.py>`__
    """

    name = "ash_s"
    variant = "s"
