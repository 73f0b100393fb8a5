"""Deep nearest neighbors (Sun et al. 2022): distance to the k-th nearest ID-train feature."""
from __future__ import annotations

import faiss
import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.faiss_index import FlatIP, inner_product_index, l2_normalize
from oodlib.stats import FitStats

class KNN(Detector):
    """Score = −‖z − z₍ₖ₎‖₂, z = h/‖h‖, z₍ₖ₎ the k-th nearest normalized ID-train feature.

    The bank is the normalized ID-train features (optionally a seeded random subsample of
    fraction ``alpha``); the distance follows from the inner product, ‖z−z'‖² = 2 − 2 zᵀz'.
    ``state_dict`` stores the bank; the index is rebuilt on load.
    """

    name = "knn"
    requires = ("features",)
    fit_needs = ("bank",)

    def __init__(self, k: int = 50, index: str = "auto", alpha: float = 1.0, nprobe: int = 32, seed: int = 0) -> None:
        self.k = int(k)
        self.index_kind = index
        self.alpha = float(alpha)
        self.nprobe = int(nprobe)
        self.seed = int(seed)
        self.bank: np.ndarray | None = None
        self._index: faiss.Index | FlatIP | None = None

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None, head: Head | None = None) -> "KNN":
        bank = l2_normalize(features)
        if self.alpha < 1.0:
            rng = np.random.default_rng(self.seed)
            bank = bank[np.sort(rng.choice(len(bank), size=max(self.k, int(round(self.alpha * len(bank)))), replace=False))]
        return self._set_bank(bank)

    def fit_stats(self, stats: FitStats, head: Head) -> "KNN":
        raise NotImplementedError("KNN needs the feature bank itself: call KNN.fit(features)")

    def _set_bank(self, bank: np.ndarray) -> "KNN":
        if len(bank) < self.k:
            raise ValueError(f"k={self.k} exceeds the bank size {len(bank)}")
        self.bank = np.ascontiguousarray(bank, np.float32)
        self._index = inner_product_index(self.bank, self.index_kind, nprobe=self.nprobe, seed=self.seed)
        return self

    def kth_similarity(self, features: np.ndarray) -> np.ndarray:
        """Inner product of each normalized row with its k-th most similar bank row (N,)."""
        sims, _ = self._index.search(l2_normalize(features), self.k)
        return sims[:, self.k - 1]

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        sim = self.kth_similarity(inputs.features).astype(np.float64)
        return (-np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))).astype(np.float32)

    def params(self) -> dict:
        return {"k": self.k, "index": self.index_kind, "alpha": self.alpha, "nprobe": self.nprobe, "seed": self.seed}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "KNN":
        return self._set_bank(state["bank"])
