"""Gram matrices (Sastry & Oore, ICML 2020): deviations of intermediate-layer Gram statistics from
the class-wise ID ranges.

EMBED writes the ``gram`` column (:class:`oodlib.layers.Gram`: per layer l and power p the row sums
of the p-th order Gram matrix, sign·|·|^{1/p}). FIT keeps, per (layer, power, entry, true class),
the min and max over a random 90% of each class of the ID-train rows; the other 10% give the
expected deviation Eₗ of each layer. A row's deviation from the *predicted* class's bounds is
δₗ = Σ relu(min−g)/|min+10⁻⁶| + Σ relu(g−max)/|max+10⁻⁶| over the layer's entries, and

    score = −(Σₗ δₗ/Eₗ) / MSP     (higher = more ID).

:see Implementation: Jingkang50/OpenOOD@3c35632 ``openood/postprocessors/gram_postprocessor.py``
(``G_p``, ``delta``, ``sample_estimator``, ``get_deviations``).

Deviations from OpenOOD: its hooks take *every* Conv2d and ReLU output; here the layers are the
``layers`` hyperparameter (default: the model's block outputs, like pytorch-ood's ``Gram``). An
Eₗ of 0 (no held-out rows, or none outside the bounds) is taken as 1 (pytorch-ood) instead of
dividing by zero. pytorch-ood's ``Gram`` returns +Σₗ δₗ/Eₗ without the ÷MSP.
"""
from __future__ import annotations

import numpy as np
from scipy.special import softmax

from oodlib.detectors.base import Head, ScoreInputs
from oodlib.detectors.columns import (
    ColumnFitted,
    as_tuple,
    layer_blocks,
    random_layer_columns,
)


def gram_deviation(g: np.ndarray, mins: np.ndarray, maxs: np.ndarray, widths) -> np.ndarray:
    """δ per layer (N×L, float64) of rows g (N×W) against per-row bounds mins/maxs (N×W)."""
    g, mins, maxs = (np.asarray(a, np.float64) for a in (g, mins, maxs))
    below, above = np.maximum(mins - g, 0), np.maximum(g - maxs, 0)
    # 0/0 (a bound of exactly −10⁻⁶ that is not crossed) counts 0, not NaN
    dev = np.divide(below, np.abs(mins + 1e-6), out=np.zeros_like(below), where=below > 0)
    dev += np.divide(above, np.abs(maxs + 1e-6), out=np.zeros_like(above), where=above > 0)
    return np.add.reduceat(dev, np.r_[0, np.cumsum(widths)[:-1]], axis=1) if dev.shape[1] else dev


def holdout_rows(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Mask of the rows held out for Eₗ: ⌊fraction·nₖ⌋ random rows of each class k."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        held[rng.choice(rows, int(fraction * len(rows)), replace=False)] = True
    return held


class Gram(ColumnFitted):
    """Score = −(Σₗ δₗ/Eₗ)/MSP from the ``gram`` column (see the module docstring).

    ``layers`` and ``powers`` set what EMBED computes (``layers=None``: the model's defaults, see
    :data:`oodlib.layers.DEFAULT_LAYERS`; lists, or comma-separated strings); ``holdout`` is the fraction of each class held out for
    Eₗ, drawn with ``seed``.
    """

    name = "gram"
    requires = ("logits", "gram", "gram_sizes")
    fit_columns = ("gram", "gram_sizes")

    def __init__(self, layers: list[str] | str | None = None, powers=(1, 2, 3, 4, 5), holdout: float = 0.1, seed: int = 0) -> None:
        self.layers = as_tuple(layers)
        self.powers = as_tuple(powers, int)
        if not self.powers or min(self.powers) < 1:
            raise ValueError(f"Gram: powers must be integers ≥ 1, got {powers}")
        self.holdout = float(holdout)
        self.seed = int(seed)

    @classmethod
    def contract_extras(cls, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return random_layer_columns("gram", [3 * 5, 4 * 5], n, rng)

    def _fit(self, features, labels, head: Head, extras) -> "Gram":
        blocks = layer_blocks(extras["gram"], extras["gram_sizes"], self.name)
        widths = np.array([b.shape[1] for b in blocks])
        g = np.concatenate(blocks, 1)
        num_classes = head.W.shape[0]
        counts = np.bincount(labels, minlength=num_classes)
        if (counts == 0).any() or labels.max() >= num_classes:
            raise ValueError(f"detector 'gram': classes {np.flatnonzero(counts == 0).tolist()} have no fitting rows")
        held = holdout_rows(labels, num_classes, self.holdout, self.seed)
        mins = np.empty((num_classes, g.shape[1]), np.float32)
        maxs = np.empty_like(mins)
        for c in range(num_classes):
            kept = g[(labels == c) & ~held]
            mins[c], maxs[c] = kept.min(0), kept.max(0)
        dev = gram_deviation(g[held], mins[labels[held]], maxs[labels[held]], widths)
        norms = dev.mean(0) if held.any() else np.ones(len(widths))
        self.mins_, self.maxs_, self.sizes_ = mins, maxs, widths
        self.norms_ = np.where(norms > 0, norms, 1.0)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        g = np.concatenate(layer_blocks(inputs.extras["gram"], inputs.extras["gram_sizes"], self.name, self.sizes_), 1)
        probs = softmax(np.asarray(inputs.logits, np.float64), axis=1)
        pred, msp = probs.argmax(1), probs.max(1)
        total = np.empty(len(g))
        for i in range(0, len(g), 1024):  # bounded memory: N×W bounds per chunk
            sl = slice(i, i + 1024)
            total[sl] = (gram_deviation(g[sl], self.mins_[pred[sl]], self.maxs_[pred[sl]], self.sizes_) / self.norms_).sum(1)
        return -total / msp
