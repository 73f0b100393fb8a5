"""Deep nearest neighbors (Sun et al. 2022): distance to the k-th nearest ID-train feature."""
from __future__ import annotations

import faiss
import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.faiss_index import FlatIP, inner_product_index, l2_normalize

class KNN(Detector):
    """Score = −‖z − z₍ₖ₎‖₂, z = h/‖h‖, z₍ₖ₎ the k-th nearest normalized ID-train feature.

    The bank is the normalized ID-train features (optionally a seeded random subsample of
    fraction ``alpha``); the distance follows from the inner product, ‖z−z'‖² = 2 − 2 zᵀz'.
    The fitted state is the bank (``bank_``); the index is rebuilt on load.
    """

    name = "knn"
    requires = ("features",)
    fit_needs = ("bank",)

    def __init__(self, k: int = 50, index: str = "auto", alpha: float = 1.0, nprobe: int = 32, seed: int = 0) -> None:
        self.k = int(k)
        self.index = index
        self.alpha = float(alpha)
        self.nprobe = int(nprobe)
        self.seed = int(seed)

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None, head: Head | None = None) -> "KNN":
        bank = l2_normalize(features)
        if self.alpha < 1.0:
            rng = np.random.default_rng(self.seed)
            bank = bank[np.sort(rng.choice(len(bank), size=max(self.k, int(round(self.alpha * len(bank)))), replace=False))]
        if len(bank) < self.k:
            raise ValueError(f"k={self.k} exceeds the bank size {len(bank)}")
        self.bank_ = np.ascontiguousarray(bank, np.float32)
        self._restore()
        return self

    def _restore(self) -> None:
        self._index: faiss.Index | FlatIP = inner_product_index(self.bank_, self.index, nprobe=self.nprobe, seed=self.seed)

    def kth_similarity(self, features: np.ndarray) -> np.ndarray:
        """Inner product of each normalized row with its k-th most similar bank row (N,)."""
        self.check_fitted()
        sims, _ = self._index.search(l2_normalize(features), self.k)
        return sims[:, self.k - 1]

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        sim = self.kth_similarity(inputs.features).astype(np.float64)
        return -np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))
