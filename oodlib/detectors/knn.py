"""Deep nearest neighbors (Sun et al. 2022): distance to the k-th nearest ID-train feature."""
from __future__ import annotations

import faiss
import numpy as np
import torch

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.stats import FitStats

#: Banks above this many rows use an approximate (IVF) index under ``index="auto"``.
EXACT_MAX_ROWS = 1_000_000


def l2_normalize(h: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float32, contiguous); zero rows stay zero."""
    h = np.asarray(h, np.float32)
    return np.ascontiguousarray(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12))


def build_index(bank: np.ndarray, kind: str = "auto", nprobe: int = 32, seed: int = 0) -> faiss.Index:
    """Inner-product faiss index over normalized rows ``bank`` (N×D float32).

    ``kind``: ``"flat"`` (exact), ``"ivf"`` (IVF-Flat, nlist = 4·√N, trained on ≤ 256·nlist rows,
    ``nprobe`` lists searched), ``"hnsw"`` (HNSW, M = 32), or ``"auto"`` = flat up to
    :data:`EXACT_MAX_ROWS` rows, IVF above. Moved to a GPU when faiss has GPU support and CUDA
    is visible.
    """
    n, d = bank.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX_ROWS else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(n // 39, int(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = bank[np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))]
        index.train(train)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index kind {kind!r}; use auto, flat, ivf or hnsw")
    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and kind != "hnsw":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(bank)
    return index


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
        self._index: faiss.Index | None = None

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
        self._index = build_index(self.bank, self.index_kind, self.nprobe, self.seed)
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
