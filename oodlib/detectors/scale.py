"""SCALE (Xu et al. 2024) and LTS (Djurisic et al. 2025): energy of logits rescaled by how much of
the pooled feature's mass lies in its top activations (no pruning)."""
from __future__ import annotations

import numpy as np

from oodlib.detectors.ash import top_k
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score
from oodlib.stats import FitStats


def mass_ratio(h: np.ndarray, percentile: float) -> np.ndarray:
    """r = Σh / Σ top-k(h) per row (float32), k = :func:`~oodlib.detectors.ash.keep_count`."""
    t, v, _ = top_k(h, percentile)
    return (t.sum(dim=1) / v.sum(dim=1)).numpy()


class SCALE(Detector):
    """Score = logsumexp(W(h·e^r) + b), r = Σh / Σ top-k(h), P = 85 (OpenOOD, and the authors'
    ResNet-50 ``scale@85``; CIFAR DenseNet: 95). The unpruned h is scaled, so the logits are
    e^r(z − b) + b from the stored logits z. ``percentile`` in percent (pytorch-ood: a fraction).

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/networks/scale_net.py>`__
    """

    name = "scale"
    requires = ("features", "logits")
    fit_needs = ("moments",)  # nothing is fitted but the head's bias

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = float(percentile)

    def fit_stats(self, stats: FitStats, head: Head) -> "SCALE":
        self.b_ = np.asarray(head.b, np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        factor = np.exp(mass_ratio(inputs.features, self.percentile))[:, None]
        return energy_score(factor * (np.asarray(inputs.logits, np.float32) - self.b_) + self.b_)


class LTS(Detector):
    """Logit scaling: score = logsumexp(z·S), S = (Σ relu(h) / Σ top-k relu(h))², k from
    ``percentile`` P = 95 (pytorch-ood's ``LTS(p=0.05)``: the top 5%; it also keeps k ≥ 1).

    :see Implementation: `andrijazz/lts <https://github.com/andrijazz/lts/blob/1ecc6fa/lts.py>`__
    """

    name = "lts"
    requires = ("features", "logits")

    def __init__(self, percentile: float = 95.0) -> None:
        self.percentile = float(percentile)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        h = np.maximum(np.asarray(inputs.features, np.float32), 0)
        s = mass_ratio(h, self.percentile) ** 2
        return energy_score(np.asarray(inputs.logits, np.float32) * s[:, None])
