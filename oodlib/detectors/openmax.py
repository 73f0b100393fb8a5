"""OpenMax (Bendale & Boult 2016): logits recalibrated by per-class Weibull models of the distance
to the class's mean activation vector, with an explicit "unknown" class."""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from oodlib.detectors._util import chunks, class_sums
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.she import fallback_means

#: libMR shifts the tail by this before fitting the Weibull (kept by pytorch-ood's LibNotMR)
TRANSLATION = 10000.0


def fit_high(distances: np.ndarray, tailsize: int) -> tuple[float, float, float]:
    """libMR's ``fit_high`` as pytorch-ood's ``LibNotMR`` does it with SciPy: a Weibull (loc 0)
    fitted by ``exponweib.fit(…, floc=0, f0=1)`` to the ``tailsize`` largest distances shifted by
    :data:`TRANSLATION` − their minimum. Returns (min of the tail, shape c, scale)."""
    from scipy.stats import exponweib  # 0.6 s to import: not on every worker that imports the detectors

    tail = np.sort(np.asarray(distances, np.float64))[-tailsize:]
    lo = float(tail.min())
    params = exponweib.fit(tail + TRANSLATION - lo, floc=0, f0=1)
    return lo, float(params[1]), float(params[3])


def w_score(distances: np.ndarray, lo: np.ndarray, c: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The Weibull CDF at the shifted distances (libMR's ``w_score``), broadcast elementwise."""
    x = np.maximum(distances + TRANSLATION - lo, 0.0) / scale
    with np.errstate(over="ignore"):  # x^c = inf far above the tail: the CDF is 1
        return -np.expm1(-(x ** c))


class OpenMax(Detector):
    """Score = −P(unknown) of the OpenMax layer, fitted on ID-train logits.

    Fit: MAV_k = the mean logit vector of the rows of class k that are classified correctly; a
    Weibull (:func:`fit_high`) on the ``tailsize`` largest Euclidean distances of those rows to
    MAV_k. Score: for the ``alpha`` largest logits (rank i = 1…α) ω = (α+1−i)/α, w_k the Weibull CDF
    of ‖z − MAV_k‖; z'_k = z_k(1 − ω_k w_k), unknown = Σ_k z_k ω_k w_k, and P(unknown) is its share of
    softmax([z', unknown]). Defaults: tail 20, α = 3, Euclidean (OpenOOD). pytorch-ood's
    ``OpenMax(tailsize=25, alpha=10)`` uses every row of a class for its centre and returns +P.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/openmax_postprocessor.py>`__
    """

    name = "openmax"
    requires = ("logits",)
    fit_needs = ("bank",)

    def __init__(self, tailsize: int = 20, alpha: int = 3) -> None:
        self.tailsize = int(tailsize)
        self.alpha = int(alpha)

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "OpenMax":
        labels = np.asarray(labels, np.int64)
        n_classes = head.W.shape[0]
        correct = np.zeros(len(labels), bool)
        sums = [(np.zeros((n_classes, n_classes)), np.zeros(n_classes, np.int64)) for _ in range(2)]
        for part in chunks(len(labels)):  # the logits chunk by chunk: N×C would not fit at ImageNet scale
            z, y = head.logits(features[part]), labels[part]
            correct[part] = z.argmax(axis=1) == y
            for acc, by in zip(sums, (np.where(correct[part], y, -1), y)):
                s, c = class_sums(z, by, n_classes)
                acc[0][...] += s
                acc[1][...] += c
        mav = fallback_means(sums[0], sums[1], "OpenMax")
        # the rows each centre was computed from: the correct ones, or all rows of a fallback class
        used = correct | (sums[0][1] == 0)[labels]
        dist = np.empty(len(labels))
        for part in chunks(len(labels)):
            dist[part] = np.linalg.norm(head.logits(features[part]) - mav[labels[part]], axis=1)
        params = np.array([fit_high(dist[used & (labels == k)], self.tailsize) for k in range(n_classes)])
        self.mav_ = mav
        self.weibull_min_, self.weibull_c_, self.weibull_scale_ = (np.ascontiguousarray(params[:, i]) for i in range(3))
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        z = np.asarray(inputs.logits, np.float64)
        alpha = min(self.alpha, z.shape[1])
        out = np.empty(len(z))
        weights = (alpha - np.arange(alpha)) / alpha  # (α+1−i)/α for i = 1…α
        for part in chunks(len(z), 4096):
            zc = z[part]
            top = np.argpartition(-zc, alpha - 1, axis=1)[:, :alpha]
            rows = np.arange(len(zc))[:, None]
            top = np.take_along_axis(top, np.argsort(-zc[rows, top], axis=1, kind="stable"), axis=1)
            dist = np.linalg.norm(zc[:, None, :] - self.mav_[top], axis=2)
            w = w_score(dist, self.weibull_min_[top], self.weibull_c_[top], self.weibull_scale_[top])
            revised = zc.copy()
            shrink = zc[rows, top] * w * weights
            revised[rows, top] -= shrink
            unknown = shrink.sum(axis=1)
            out[part] = np.exp(unknown - logsumexp(np.column_stack([revised, unknown]), axis=1))
        return -out
