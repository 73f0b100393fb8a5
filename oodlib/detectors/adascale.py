"""AdaSCALE (Regmi et al., 2025): SCALE with a per-image percentile set by how much the features
move under a small input perturbation.

EMBED writes ``adascale_correction`` Cₒ and ``adascale_shift`` Q (:class:`oodlib.layers.AdaScale`:
the perturbation x̃ = x + 0.5·sign(∇ₓ max logit) on the o share of input elements with the smallest
|∇ₓ|; Cₒ = Σ over the top-k₁% of h of relu(h̃), Q = Σ over the top-k₂% of h of |h − h̃|). FIT keeps
the ECDF of Q′ = Cₒ + λQ over ``num_samples`` random ID-**val** rows. Per row,
p = p_min + (1 − ECDF(Q′))·(p_max − p_min), k = D − round(D·p/100),
r = Σ relu(h) / Σ_{top-k} relu(h), and

    AdaSCALE-A: score = logsumexp(W(h·eʳ) + b);   AdaSCALE-L: score = logsumexp(z·r²).

:see Implementation: Jingkang50/OpenOOD@3c35632 ``openood/postprocessors/adascale_postprocessor.py``
(``perturb``, ``get_percentile``, ``set_hyperparam``), ``openood/networks/adascale_net.py``
(``ada_scale``, ``forward_threshold``), ``configs/postprocessors/adascale_a.yml``.

λ and the percentiles are applied here, so sweeping them reuses EMBED's columns (k₁, k₂ and o
are EMBED's). A row whose top-k sum is 0 (h = 0) gets r = 0 instead of 0/0.
"""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Head, ScoreInputs
from oodlib.detectors.columns import ColumnFitted, as_tuple
from oodlib.detectors.logits import energy_score


def adaptive_scale(h: np.ndarray, percentiles: np.ndarray) -> np.ndarray:
    """r = Σ relu(h) / Σ_{top-k} relu(h) per row, k = D − round(D·p/100) (``ada_scale``)."""
    x = np.maximum(np.asarray(h, np.float64), 0)
    d = x.shape[1]
    k = d - np.round(d * np.asarray(percentiles, np.float64) / 100.0).astype(np.int64)
    if (k < 1).any() or (k > d).any():
        raise ValueError(f"AdaSCALE: percentiles must lie in (0, 100), got [{np.min(percentiles)}, {np.max(percentiles)}]")
    top = np.cumsum(-np.sort(-x, axis=1), axis=1)[np.arange(len(x)), k - 1]
    return np.divide(x.sum(1), top, out=np.zeros(len(x)), where=top > 0)


class AdaScaleA(ColumnFitted):
    """AdaSCALE-A from the features and the two EMBED columns (see the module docstring)."""

    name = "adascale_a"
    requires = ("features", "adascale_correction", "adascale_shift")
    fit_columns = ("adascale_correction", "adascale_shift")
    fit_split = "val"

    def __init__(self, percentile=(75.0, 85.0), k1: float = 5.0, k2: float = 1.0, lmbda: float = 10.0, o: float = 0.05,
                 num_samples: int = 5000, seed: int = 0) -> None:
        self.percentile = as_tuple(percentile, float)  # [p_min, p_max], or "p_min,p_max" from a config
        if len(self.percentile) != 2 or not 0 < self.percentile[0] <= self.percentile[1] < 100:
            raise ValueError(f"AdaSCALE: percentile must be [p_min, p_max] with 0 < p_min ≤ p_max < 100, got {percentile}")
        self.k1, self.k2, self.lmbda, self.o = float(k1), float(k2), float(lmbda), float(o)
        self.num_samples = int(num_samples)
        self.seed = int(seed)

    def _q(self, extras) -> np.ndarray:
        return np.asarray(extras["adascale_correction"], np.float64) + self.lmbda * np.asarray(extras["adascale_shift"], np.float64)

    def _fit(self, features, labels, head: Head, extras) -> "AdaScaleA":
        q = self._q(extras)
        if len(q) == 0:
            raise ValueError(f"detector {self.name!r}: no ID-val rows to fit the ECDF on")
        if len(q) > self.num_samples:
            q = q[np.random.default_rng(self.seed).permutation(len(q))[: self.num_samples]]
        self.ecdf_ = np.sort(q)
        self.W_, self.b_ = np.asarray(head.W, np.float32), np.asarray(head.b, np.float32)
        return self

    def percentiles(self, inputs: ScoreInputs) -> np.ndarray:
        """The per-row percentile p (float64)."""
        ecdf = np.searchsorted(self.ecdf_, self._q(inputs.extras), side="right") / len(self.ecdf_)
        lo, hi = self.percentile
        return lo + (1.0 - ecdf) * (hi - lo)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        h = np.asarray(inputs.features, np.float32)
        r = adaptive_scale(h, self.percentiles(inputs))
        return energy_score((h * np.exp(r)[:, None].astype(np.float32)) @ self.W_.T + self.b_)


class AdaScaleL(AdaScaleA):
    """AdaSCALE-L: the logits scaled by r² instead of the features by eʳ."""

    name = "adascale_l"

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        h = np.asarray(inputs.features, np.float32)
        r = adaptive_scale(h, self.percentiles(inputs))
        return energy_score((h @ self.W_.T + self.b_) * (r**2)[:, None])
