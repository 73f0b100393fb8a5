"""NAC-UE (Liu et al., ICLR 2024): neuron activation coverage of ID training data.

EMBED writes the ``nac`` column (:class:`oodlib.layers.NacStates`): per layer and neuron the
pre-sigmoid state ō·ḡ, ō and ḡ the layer output and ∂L/∂o summed over space, L = Σₖ −(1/C) log pₖ.
The state is sigmoid(αₗ·ō·ḡ). FIT bins the states of ``fit_samples`` class-balanced ID-train rows
into the authors' Mₗ−1 symmetric log-spaced bins per neuron; a bin's coverage is
min(count/Oₗ, 1). A row's layer score is the mean over neurons of the coverage of its bin, and

    score = mean over layers of the layer scores   (higher = more ID).

:see Implementation: BierOne/ood_coverage@b002780 ``openood/postprocessors/nac/coverage.py``
(``logspace``, ``Estimator.update``/``get_score``/``ood_test``, ``KMNC.assess_ood``),
``nac/instr_state.py`` (``kl_grad``), ``nac/utils.py`` (``avg_pooling`` — a sum —,
``TrainSubset``, ``get_state_func``) and ``configs/postprocessors/nac/resnet/nac_imagenet.yml``.

α is applied here, not in EMBED, so sweeping α, O or M reuses the stored states. Defaults: the
authors' ImageNet ResNet-50 values for the layers (avgpool, layer3, layer2, layer1). pytorch-ood's
``NACUE`` pools the product o⊙g by a mean, uses other bins and sums over layers, so it is not
the same score.
"""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Head, ScoreInputs
from oodlib.detectors.columns import (
    ColumnFitted,
    as_tuple,
    layer_blocks,
    per_layer,
    random_layer_columns,
)


def nac_thresholds(m: int) -> np.ndarray:
    """The authors' M bin edges (``coverage.logspace(1e3, M)``): log-spaced from 0 to 0.5, mirrored
    to 1 (the last edge 1.01), then 1.2 — M−1 bins, dense near 0 and 1."""
    if m < 4 or m % 2:
        raise ValueError(f"NAC: the number of bin edges M must be even and ≥ 4, got {m}")
    x_l = np.emath.logn(1e3, np.linspace(1, np.sqrt(1e3), num=m // 2))
    x = np.concatenate([x_l[:-1], (1 - x_l)[::-1]])
    x[-1] += 1e-2
    return np.append(x, 1.2)


def nac_bins(states: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bin index, inside any bin) of each state: bin i holds thresholds[i] ≤ s < thresholds[i+1]."""
    idx = np.searchsorted(thresholds, np.asarray(states, np.float64), side="right") - 1
    inside = (idx >= 0) & (idx < len(thresholds) - 1)
    return np.clip(idx, 0, len(thresholds) - 2), inside


def nac_state(prod: np.ndarray, alpha: float) -> np.ndarray:
    """sigmoid(α·ō·ḡ) in float32, as the authors' ``sigmoid(x, sig_alpha)``."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-np.float32(alpha) * np.asarray(prod, np.float32)))).astype(np.float32)


def balanced_subset(labels: np.ndarray, num_classes: int, total: int, seed: int) -> np.ndarray:
    """Row indices of ⌊total/C⌋ rows per class (at most the smallest class's count), each class's
    rows shuffled by ``RandomState(seed)`` as the authors' ``TrainSubset(balanced=True)``."""
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    n = min(total // num_classes, min(len(r) for r in per_class))
    if n == 0:
        raise ValueError(f"NAC: {total} fitting samples give none per class for {num_classes} classes "
                         f"(or a class has no rows); raise fit_samples")
    out = []
    for rows in per_class:
        rows = rows.copy()
        np.random.RandomState(seed).shuffle(rows)
        out.append(rows[:n])
    return np.sort(np.concatenate(out))


class NACUE(ColumnFitted):
    """Neuron activation coverage from the ``nac`` column (see the module docstring).

    ``layers`` sets what EMBED computes (None: the model's defaults, :data:`oodlib.layers.DEFAULT_LAYERS`);
    ``alpha`` (sigmoid steepness), ``m_bins`` (M) and ``o_star`` (O) are one value for every layer
    or one per layer (lists, or comma-separated strings); ``fit_samples`` class-balanced train rows (the authors' ``valid_num``) drawn
    with ``seed``.
    """

    name = "nac"
    requires = ("nac", "nac_sizes")
    fit_columns = ("nac", "nac_sizes")

    def __init__(self, layers: list[str] | str | None = None, alpha=(3000.0, 300.0, 0.01, 1.0), m_bins=(50, 50, 500, 1000),
                 o_star=(10.0, 500.0, 50.0, 5000.0), fit_samples: int = 1000, seed: int = 1) -> None:
        self.layers = as_tuple(layers)
        self.alpha = as_tuple(alpha, float, scalar=True)
        self.m_bins = as_tuple(m_bins, int, scalar=True)
        self.o_star = as_tuple(o_star, float, scalar=True)
        self.fit_samples = int(fit_samples)
        self.seed = int(seed)

    @classmethod
    def contract_extras(cls, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cols = random_layer_columns("nac", [3, 4, 2, 5], n, rng, low=-1.0)
        cols["nac"] *= 1e-3  # states spread over (0, 1) at the default α
        return cols

    def _fit(self, features, labels, head: Head, extras) -> "NACUE":
        blocks = layer_blocks(extras["nac"], extras["nac_sizes"], self.name)
        n_layers = len(blocks)
        alphas = per_layer(self.alpha, n_layers, "alpha", self.name)
        ms = per_layer(self.m_bins, n_layers, "m_bins", self.name).astype(np.int64)
        os_ = per_layer(self.o_star, n_layers, "o_star", self.name)
        rows = balanced_subset(labels, head.W.shape[0], self.fit_samples, self.seed)
        self.coverage_, self.thresholds_ = {}, {}
        for l, block in enumerate(blocks):
            thr = nac_thresholds(int(ms[l]))
            idx, inside = nac_bins(nac_state(block[rows], alphas[l]), thr)
            n = block.shape[1]
            flat = (idx * n + np.arange(n))[inside]
            counts = np.bincount(flat, minlength=(len(thr) - 1) * n).reshape(len(thr) - 1, n)
            self.coverage_[str(l)] = np.minimum(counts / os_[l], 1.0).astype(np.float32)
            self.thresholds_[str(l)] = thr
        self.alphas_ = alphas
        self.sizes_ = np.array([b.shape[1] for b in blocks])
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        blocks = layer_blocks(inputs.extras["nac"], inputs.extras["nac_sizes"], self.name, self.sizes_)
        total = np.zeros(len(inputs))
        for l, block in enumerate(blocks):
            idx, inside = nac_bins(nac_state(block, self.alphas_[l]), self.thresholds_[str(l)])
            cov = self.coverage_[str(l)][idx, np.arange(block.shape[1])]
            total += np.where(inside, cov, 0.0).mean(1)
        return total / len(blocks)
