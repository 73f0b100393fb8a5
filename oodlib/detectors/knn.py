"""Deep nearest neighbors (Sun et al. 2022): distance to the k-th nearest ID-train feature."""
from __future__ import annotations

import faiss
import numpy as np

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.faiss_index import FlatIP, inner_product_index, l2_normalize
from oodlib.sampling import id_sample


class SampledBank:
    """Mixin of the detectors whose fitted state is a bank of ID-train rows drawn as a seeded
    sample (KNN, NNGuide): the rows with ``u(id) < alpha`` (:mod:`oodlib.sampling`, seed ``seed``),
    topped up to ``k`` rows with the smallest ``u``; every row when ``alpha ≥ 1``. The rule needs
    nothing but each row's id, so FIT draws the bank in its workers, file by file, and the driver
    only ever holds the sample (``bank_sample`` → ``fit_bank``); ``fit(features, labels, head,
    image_ids)`` draws the same rows from rows in memory (ids: the image ids; without them the row
    numbers ``"0"``, ``"1"``, …). The bank keeps the rows' order. The sample's size is ≈ alpha·N
    (binomial), not exactly ``round(alpha·N)``.
    """

    alpha: float
    seed: int
    k: int

    def bank_sample(self) -> tuple[float, int, int]:
        """(fraction, seed, minimum rows) of the bank's sample."""
        return self.alpha, self.seed, self.k

    def fit_bank(self, features: np.ndarray, head: Head | None = None):
        """Fit on the drawn bank rows (N×D). Returns self."""
        raise NotImplementedError

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None, head: Head | None = None,
            image_ids=None):
        features = np.asarray(features)
        ids = [str(i) for i in range(len(features))] if image_ids is None else list(image_ids)
        if len(ids) != len(features):
            raise ValueError(f"{len(ids)} image ids for {len(features)} feature rows")
        fraction, seed, minimum = self.bank_sample()
        return self.fit_bank(features[id_sample(ids, fraction, seed, minimum)], head)


class KNN(SampledBank, Detector):
    """Score = −‖z − z₍ₖ₎‖₂, z = h/‖h‖, z₍ₖ₎ the k-th nearest normalized ID-train feature.

    The bank is the normalized ID-train features — with ``alpha`` < 1 a seeded sample of them
    (:class:`SampledBank`: by image id, drawn in FIT's workers); the distance follows from the
    inner product, ‖z−z'‖² = 2 − 2 zᵀz'. The fitted state is the bank (``bank_``); the index is
    rebuilt on load.
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

    def fit_bank(self, features: np.ndarray, head: Head | None = None) -> "KNN":
        if len(features) < self.k:
            raise ValueError(f"k={self.k} exceeds the bank size {len(features)}")
        self.bank_ = np.ascontiguousarray(l2_normalize(features), np.float32)
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
