"""VRA (Xu et al. 2023) as OpenOOD implements it: clip the pooled feature to [t_lo, t_hi], the
low and high percentiles of the ID-val activations, then score the energy."""
from __future__ import annotations

import numpy as np

from oodlib.detectors._util import require_rows
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score


class VRA(Detector):
    """Score = logsumexp(W·clip(h, t_lo, t_hi) + b), t_lo/t_hi = the ``lower``/``upper``
    percentiles (10, 90) of **all entries** of the ID-val features (OpenOOD).

    ``per_feature=True`` takes the percentiles of each feature dimension separately, which is
    pytorch-ood's ``VRA`` (per-element quantiles, default 1/99) on pooled features.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/vra_postprocessor.py>`__
    """

    name = "vra"
    requires = ("features",)
    fit_needs = ("bank",)
    fit_split = "val"

    def __init__(self, lower: float = 10.0, upper: float = 90.0, per_feature: bool = False) -> None:
        if lower > upper:
            raise ValueError(f"lower percentile {lower} exceeds upper {upper}")
        self.lower = float(lower)
        self.upper = float(upper)
        self.per_feature = bool(per_feature)

    def fit(self, features: np.ndarray, labels: np.ndarray | None, head: Head) -> "VRA":
        h = np.asarray(require_rows(features, "VRA"), np.float32)
        values = h if self.per_feature else h.reshape(-1)
        lo, hi = np.percentile(values, [self.lower, self.upper], axis=0)
        self.lower_ = np.asarray(lo, np.float32)
        self.upper_ = np.asarray(hi, np.float32)
        self.W_, self.b_ = np.asarray(head.W, np.float32), np.asarray(head.b, np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        h = np.clip(np.asarray(inputs.features, np.float32), self.lower_, self.upper_)
        return energy_score(h @ self.W_.T + self.b_)
