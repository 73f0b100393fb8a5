"""SHE (Zhang et al. 2023): simplified Hopfield energy, the inner product of the feature with the
stored pattern of its predicted class."""
from __future__ import annotations

import warnings

import numpy as np

from oodlib.detectors._util import class_sums, predictions
from oodlib.detectors.base import Detector, Head, ScoreInputs


def class_list(mask: np.ndarray, shown: int = 10) -> str:
    """``classes [0, 4]`` — or, past ``shown`` of them, ``997 of 1000 classes (0, 1, …, 999)``."""
    ids = np.flatnonzero(mask).tolist()
    if len(ids) <= shown:
        return f"classes {ids}"
    head = ", ".join(map(str, ids[: shown - 1]))
    return f"{len(ids)} of {len(mask)} classes ({head}, …, {ids[-1]})"


def fallback_means(correct: tuple[np.ndarray, np.ndarray], every: tuple[np.ndarray, np.ndarray], what: str) -> np.ndarray:
    """Per-class means (C×D float64) from the (sums, counts) of the correctly classified rows;
    a class with training rows but none predicted correctly falls back to the mean of all its
    rows (``every``), with a warning (OpenOOD would store NaN, pytorch-ood raises); a class without
    rows raises."""
    (sums, counts), (all_sums, all_counts) = correct, every
    if (all_counts == 0).any():
        raise ValueError(f"{what}: {class_list(all_counts == 0)} have no training rows")
    missing = counts == 0
    if missing.any():
        warnings.warn(f"{what}: {class_list(missing)} have no correctly classified training row; "
                      "using the mean of all their rows", RuntimeWarning, stacklevel=3)
        sums, counts = np.where(missing[:, None], all_sums, sums), np.where(missing, all_counts, counts)
    return sums / counts[:, None]


def correct_class_means(x: np.ndarray, labels: np.ndarray, pred: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    """Per class k the mean of the rows of x with label = prediction = k (C×D float64), with the
    fallback of :func:`fallback_means`."""
    labels = np.asarray(labels, np.int64)
    correct = class_sums(x, np.where(labels == pred, labels, -1), n_classes)
    return fallback_means(correct, class_sums(x, labels, n_classes), what)


class SHE(Detector):
    """Score = ⟨h, m_ŷ⟩, m_k = the mean ID-train feature of the rows with label = prediction = k
    (OpenOOD's ``metric: inner_product``). pytorch-ood's ``SHE`` returns −score.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/she_postprocessor.py>`__
    """

    name = "she"
    requires = ("features", "logits")
    fit_needs = ("bank",)

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "SHE":
        pred = predictions(features, head)
        self.patterns_ = correct_class_means(features, labels, pred, head.W.shape[0], "SHE").astype(np.float32)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        pred = np.argmax(inputs.logits, axis=1)
        return np.einsum("nd,nd->n", np.asarray(inputs.features, np.float32), self.patterns_[pred])
