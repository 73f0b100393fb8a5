"""NNGuide (Park et al. 2023): energy guided by the similarity to an energy-scaled ID-train bank."""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp

from oodlib.detectors._util import chunks
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.knn import SampledBank
from oodlib.detectors.logits import energy_score
from oodlib.faiss_index import l2_normalize


class NNGuide(SampledBank, Detector):
    """Score = E(x) · mean of the k largest ⟨ĥ(x), b_i⟩, b_i = ĥ_i·E_i over the bank of ID-train
    rows (ĥ = h/‖h‖₂, E = logsumexp of the logits).

    The bank is a seeded random fraction ``alpha`` of the ID-train rows (at least k; drawn by image
    id in FIT's workers, :class:`~oodlib.detectors.knn.SampledBank`), k = 10, as in the authors'
    code (``bankset_ratio=0.01``); OpenOOD takes the *first* 1% of the train
    loader with K = 100 and adds 1e-10 to every normalized entry. pytorch-ood's ``NNGuide(k=10)``
    uses every row it is fitted on and returns −score. Exact search (float32 GEMM + top-k).

    :see Implementation: `roomo7time/nnguide <https://github.com/roomo7time/nnguide/blob/c123cac/ood_detectors/nnguide.py>`__
    """

    name = "nnguide"
    requires = ("features", "logits")
    fit_needs = ("bank",)

    def __init__(self, k: int = 10, alpha: float = 0.01, seed: int = 0) -> None:
        self.k = int(k)
        self.alpha = float(alpha)
        self.seed = int(seed)

    def fit_bank(self, features: np.ndarray, head: Head) -> "NNGuide":
        features = np.asarray(features, np.float32)
        if len(features) < self.k:
            raise ValueError(f"k={self.k} exceeds the {len(features)} ID-train rows")
        energy = logsumexp(np.asarray(head.logits(features), np.float64), axis=1)
        self.bank_ = np.ascontiguousarray(l2_normalize(features) * energy[:, None].astype(np.float32))
        self._restore()
        return self

    def _restore(self) -> None:
        self._bank = torch.from_numpy(np.array(self.bank_, np.float32, order="C"))  # a copy: loaded state may be read-only

    def guidance(self, features: np.ndarray) -> np.ndarray:
        """Mean of the k largest inner products of each normalized row with the bank (N,)."""
        self.check_fitted()
        q = torch.from_numpy(l2_normalize(features))
        out = np.empty(len(q), np.float32)
        for part in chunks(len(q), 4096):
            out[part] = torch.topk(q[part] @ self._bank.T, self.k, dim=1).values.mean(dim=1).numpy()
        return out

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy_score(inputs.logits).astype(np.float64) * self.guidance(inputs.features)
