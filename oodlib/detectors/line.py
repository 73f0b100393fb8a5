"""LINE (Leveraging Important Neurons, Ahn et al. 2023) and its ablation settings.

Scoring follows the official implementation (spec ``posthoc_detectors.md``): for features h,

1. AC: ĥ = min(h, δ);  2. k = argmax(W ĥ + b);
3. AP: m_k = 1[c_k > percentile(c_k, p_a)] (c_k = signed column k of the contribution matrix);
4. WP: M_k = 1[|c_k|ᵀ ⊙ W > percentile(|c_k|ᵀ ⊙ W, p_w)] over the whole C×D matrix;
5. score = logsumexp((W ⊙ M_k)(m_k ⊙ ĥ) + b).

Each step is switchable (``delta``/``p_a``/``p_w`` = None or False disables it); with all three
off LINE is Energy. No C×C×D tensor: the per-class thresholds are fitted once, and at scoring
time each distinct predicted class k costs one sparse product. Because multiplying a row of W by
|c_k[d]| ≥ 0 keeps its order, the entries of row d of Wᵀ that WP drops are a prefix of that row
sorted once at fit time; its length comes from a binary search on the float32 products, so the
mask is bit-identical to the official one. The smaller of the dropped or kept
part is used: out = x Wᵀ − x Dropₖ (one dense GEMM for the batch) or out = x Keepₖ.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from oodlib.contribution import contribution_matrix
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import energy_score
from oodlib.stats import FitStats

#: (p_w, p_a, δ) used in the paper per ID benchmark and model.
LINE_PRESETS: dict[str, dict[str, float]] = {
    "cifar10": {"p_w": 90, "p_a": 90, "delta": 1.0},
    "cifar100": {"p_w": 90, "p_a": 10, "delta": 1.0},
    "imagenet": {"p_w": 10, "p_a": 10, "delta": 0.8},
    "imagenet-mobilenet_v2": {"p_w": 10, "p_a": 10, "delta": 0.6},
}


def _off(value: float | bool | None) -> float | None:
    """None/False → None (disabled); a number → float."""
    return None if value is None or value is False else float(value)


def wp_thresholds(contribution: np.ndarray, W: np.ndarray, p_w: float) -> np.ndarray:
    """Per column k of ``contribution`` (D×K): np.percentile(|c_k|ᵀ ⊙ W, p_w) over all C·D
    entries of the head W (C×D) → float32 (K,)."""
    W = np.asarray(W, np.float32)
    absc = np.abs(np.asarray(contribution, np.float32))
    buf = np.empty_like(W)
    out = np.empty(absc.shape[1], np.float32)
    for k in range(absc.shape[1]):
        np.multiply(absc[:, k][None, :], W, out=buf)
        out[k] = np.percentile(buf, p_w, overwrite_input=True)
    return out


class LINE(Detector):
    """LINE with activation clipping ``delta``, activation pruning ``p_a``, weight pruning ``p_w``.

    Defaults are the paper's CIFAR-10 setting; see :data:`LINE_PRESETS`. A step given as None (or
    False) is off. Fitted state: ``W_``, ``b_`` and, when AP or WP is on, ``contribution_`` (D×C)
    and the per-class thresholds ``ap_thresh_``/``wp_thresh_``.
    """

    name = "line"
    requires = ("features",)
    fit_needs = ("moments",)

    def __init__(self, p_w: float | None = 90, p_a: float | None = 90, delta: float | None = 1.0) -> None:
        self.p_w, self.p_a, self.delta = _off(p_w), _off(p_a), _off(delta)

    # ---- fitting -------------------------------------------------------------------------
    def fit_stats(self, stats: FitStats, head: Head) -> "LINE":
        if self.p_a is None and self.p_w is None:  # Energy(+AC): nothing to fit but the head
            return self.fit_contribution(None, head)
        return self.fit_contribution(contribution_matrix(stats.moments, head.W), head)

    def fit_contribution(self, contribution: np.ndarray | None, head: Head) -> "LINE":
        """Fit from a given contribution matrix (D×C), e.g. an IntGrad one; None when AP and WP are off."""
        W = np.asarray(head.W, np.float32)
        state = {"W_": W, "b_": np.asarray(head.b, np.float32)}
        if contribution is not None:
            contribution = np.ascontiguousarray(contribution, np.float32)
            state["contribution_"] = contribution
            if self.p_a is not None:
                state["ap_thresh_"] = np.percentile(contribution, self.p_a, axis=0).astype(np.float32)
            if self.p_w is not None:
                state["wp_thresh_"] = wp_thresholds(contribution, W, self.p_w)
        return self.load_state_dict(state)

    def _restore(self) -> None:
        """Derived arrays: Wᵀ rows sorted (values and column ids) for WP, the AP masks (C×D)."""
        if self.p_a is not None and not hasattr(self, "ap_thresh_") or self.p_w is not None and not hasattr(self, "wp_thresh_"):
            raise ValueError("state lacks the thresholds for the enabled pruning steps")
        self.W_ = np.ascontiguousarray(self.W_, np.float32)
        self._ap_mask = (self.contribution_ > self.ap_thresh_[None, :]).T.copy() if self.p_a is not None else None
        if self.p_w is not None:
            order = np.argsort(self.W_.T, axis=1, kind="stable")
            self._sorted_ids = order.astype(np.int32)
            self._sorted_w = np.take_along_axis(self.W_.T, order, axis=1)
            self._abs_c = np.abs(self.contribution_.T)  # C×D: row k = |c_k|

    def variant(self, **params: float | bool | None) -> "LINE":
        """A LINE sharing this fitted state with some steps switched off (e.g. ``p_w=None``).

        Only disabling is free; a different percentile needs a new fit.
        """
        kw = {"p_w": self.p_w, "p_a": self.p_a, "delta": self.delta}
        for key, value in params.items():
            if _off(value) is not None and _off(value) != kw[key] and key != "delta":
                raise ValueError(f"{key}={value} differs from the fitted {kw[key]}; fit a new LINE")
            kw[key] = value
        return LINE(**kw).load_state_dict(self.state_dict())

    # ---- scoring -------------------------------------------------------------------------
    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy_score(self.masked_logits(inputs.features))

    def masked_logits(self, features: np.ndarray) -> np.ndarray:
        """LINE's output (W ⊙ M_k)(m_k ⊙ ĥ) + b per row (N×C float32), k = the row's prediction."""
        self.check_fitted()
        h = np.asarray(features, np.float32)
        if self.delta is not None:
            h = np.minimum(h, np.float32(self.delta))
        if self.p_a is None and self.p_w is None:
            return h @ self.W_.T + self.b_
        pred = np.argmax(h @ self.W_.T + self.b_, axis=1)
        x = h * self._ap_mask[pred] if self.p_a is not None else h
        if self.p_w is None:
            return x @ self.W_.T + self.b_
        return self._weight_pruned(x, pred) + self.b_

    def _weight_pruned(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Σ_d (W ⊙ M_k)[:, d] x[d] per row (N×C), grouped by predicted class k."""
        out = np.empty((len(x), self.W_.shape[0]), np.float32)
        order = np.argsort(pred, kind="stable")
        classes, starts = np.unique(pred[order], return_index=True)
        groups = np.split(order, starts[1:])
        plans = [self._class_plan(int(k)) for k in classes]
        dense_rows = np.concatenate([g for g, (dropped, *_) in zip(groups, plans) if dropped] or [np.zeros(0, np.int64)])
        if len(dense_rows):
            out[dense_rows] = x[dense_rows] @ self.W_.T
        for rows, (dropped, dims, matrix) in zip(groups, plans):
            part = np.asarray((matrix.T @ x[np.ix_(rows, dims)].T).T, np.float32)
            out[rows] = out[rows] - part if dropped else part
        return out

    def _class_plan(self, k: int) -> tuple[bool, np.ndarray, sp.csr_matrix]:
        """For class k: (dropped?, feature dims used, sparse dims×C part of Wᵀ ⊙ M_kᵀ).

        ``dropped`` = True: the matrix holds the entries WP removes (subtract from x Wᵀ);
        False: the entries it keeps. Dims pruned by AP are left out (their x is zero).
        """
        dims = np.flatnonzero(self._ap_mask[k]) if self.p_a is not None else np.arange(self.W_.shape[1])
        n_low = self._count_at_most(k, dims)  # per dim: how many sorted entries WP drops
        n_classes = self.W_.shape[0]
        dropped = int(n_low.sum()) <= len(dims) * n_classes - int(n_low.sum())
        counts = n_low if dropped else n_classes - n_low
        indptr = np.concatenate([[0], np.cumsum(counts)])
        row = np.repeat(np.arange(len(dims)), counts)
        pos = np.arange(indptr[-1]) - indptr[row] + (0 if dropped else n_low[row])
        flat = dims[row] * n_classes + pos
        values, ids = np.take(self._sorted_w, flat), np.take(self._sorted_ids, flat)
        matrix = sp.csr_matrix((values, ids, indptr), shape=(len(dims), n_classes))
        return dropped, dims, matrix

    def _count_at_most(self, k: int, dims: np.ndarray) -> np.ndarray:
        """Per dim d: #{j : fl(|c_k[d]|·W[j, d]) ≤ t_k} (the WP-dropped entries of row d of Wᵀ).

        Binary search on the float32 products themselves (non-decreasing along each sorted row,
        since rounding is monotone), so the count matches the official mask exactly, ties included.
        """
        srt, t = self._sorted_w, self.wp_thresh_[k]
        scale = self._abs_c[k, dims]
        lo = np.zeros(len(dims), np.int64)
        hi = np.full(len(dims), srt.shape[1], np.int64)
        while True:
            active = lo < hi
            if not active.any():
                return lo
            mid = (lo + hi) // 2
            le = scale * srt[dims, np.minimum(mid, srt.shape[1] - 1)] <= t
            lo = np.where(active & le, mid + 1, lo)
            hi = np.where(active & ~le, mid, hi)


def line_ablations(line: LINE) -> dict[str, LINE]:
    """The paper's Table 3 settings from one fitted LINE, keyed by scores-table column suffix:
    ``line``, ``line_no_wp`` (p_w off), ``line_no_ap`` (p_a off), ``energy_ac`` (both off)."""
    return {
        "line": line,
        "line_no_wp": line.variant(p_w=None),
        "line_no_ap": line.variant(p_a=None),
        "energy_ac": line.variant(p_w=None, p_a=None),
    }
