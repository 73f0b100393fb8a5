"""Operating thresholds fitted on the validation split, with bootstrap intervals, and the choice of
the primary detectors.

Conventions (as in :mod:`oodlib.metrics`):

* an OOD score is an ID-confidence (higher = more in-distribution); an image is **flagged OOD when
  score < t** (:func:`ood_threshold`);
* a wrong-prediction risk is higher = more likely wrong; an image is **flagged likely wrong when
  risk ≥ t** — the convention of :func:`oodlib.metrics.recalls_at` and
  :func:`oodlib.metrics.equal_recall_threshold` (:func:`risk_threshold`).

Intervals are percentile bootstraps (2.5 and 97.5 percentiles of ``n_boot`` resamples with
replacement of the validation rows, ``numpy.random.default_rng(seed)``), so a threshold and its
interval are a deterministic function of the data and the seed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from oodlib.metrics import equal_recall_threshold, recalls_at, threshold_at_recall_correct

#: resampled values held in memory at once by the vectorised bootstrap (rows × N)
_CHUNK_VALUES = 4_000_000


def _finite(values, name: str) -> np.ndarray:
    v = np.asarray(values, np.float64).ravel()
    if len(v) == 0:
        raise ValueError(f"{name}: empty")
    if not np.isfinite(v).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return v


def _interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval: empirical quantiles, no interpolation (a bootstrap
    threshold may be +inf — nothing flagged — and inf − inf has no value)."""
    lo, hi = np.percentile(values, [2.5, 97.5], method="inverted_cdf")
    return float(lo), float(hi)


# --- OOD: flag = score < t ---------------------------------------------------------------------


def lower_quantile_index(n: int, target_tpr: float) -> int:
    """k = ⌊(1 − target_tpr)·n⌋ (clipped to n − 1): the 0-based rank of the threshold among the
    ascending scores. (1 − target_tpr)·n is rounded to 9 decimals first, so 1 − 0.95 =
    0.05000000000000004 does not lift an exact integer to the next one."""
    return min(math.floor(round((1.0 - target_tpr) * n, 9)), n - 1)


@dataclass
class OODThreshold:
    """An OOD threshold fitted on ID-val scores: flag = score < ``threshold``.

    ``threshold`` = s₍ₖ₎, the (k+1)-th smallest ID-val score with k = ⌊(1 − target_tpr)·n⌋: the
    **largest** t with #{s ≥ t} ≥ target_tpr·n, so at least ``target_tpr`` of the ID-val scores are
    kept and ``id_flag_rate`` = #{s < t}/n ≤ 1 − target_tpr (equality without ties when
    (1 − target_tpr)·n is an integer). It equals the threshold of
    :func:`oodlib.metrics.fpr_at_95_tpr` whenever (1 − tpr)·n has a fractional part below ½ (that
    one rounds k, so it can keep slightly fewer than 95%).

    ``threshold_lo/hi``: percentile-bootstrap 95% interval of the threshold. ``id_flag_rate_lo/hi``:
    the flag rate of the **full** ID-val set at each bootstrap threshold, 2.5/97.5 percentiles —
    the spread of the ID flag rate a new night should show that comes from estimating t on n
    images (a night's own sampling noise is its Wilson interval, :mod:`oodlib.verdicts.rates`).

    ``new_flag_rate_lo/hi`` (with ``n_new`` > 0): the 95% **predictive** interval of the flag rate
    on ``n_new`` fresh ID images — both sources at once: each bootstrap threshold's flag rate r_b,
    then k_b ~ Binomial(n_new, r_b) (seeded), 2.5/97.5 percentiles of k_b/n_new. It is the interval
    an ID test split of ``n_new`` images should fall in.
    """

    threshold: float
    threshold_lo: float
    threshold_hi: float
    target_tpr: float
    id_flag_rate: float
    id_flag_rate_lo: float
    id_flag_rate_hi: float
    n: int
    n_boot: int
    seed: int
    n_new: int = 0
    new_flag_rate_lo: float | None = None
    new_flag_rate_hi: float | None = None

    def flag(self, scores) -> np.ndarray:
        """Boolean (N,): score < threshold (flagged OOD)."""
        return np.asarray(scores, np.float64) < self.threshold

    def to_dict(self) -> dict:
        return asdict(self)


def ood_threshold(id_val_scores, target_tpr: float = 0.95, n_boot: int = 1000, seed: int = 0,
                  n_new: int = 0) -> OODThreshold:
    """Fit the OOD threshold on ID-val scores (N,) at ``target_tpr`` (share of ID images kept);
    ``n_new`` > 0 adds the predictive interval of the flag rate on that many fresh ID images.

    See :class:`OODThreshold` for the quantile convention and the intervals.
    """
    if not 0.0 < target_tpr <= 1.0:
        raise ValueError(f"target_tpr must be in (0, 1], got {target_tpr}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    s = np.sort(_finite(id_val_scores, "ID-val scores"))
    n = len(s)
    k = lower_quantile_index(n, target_tpr)
    t = float(s[k])
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    rows = max(1, _CHUNK_VALUES // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        # s is sorted, so the k-th smallest index of a resample is its k-th smallest score
        boot[start:stop] = s[np.partition(idx, k, axis=1)[:, k]]
    rates = np.searchsorted(s, boot, side="left") / n  # #{s < t_b} / n on the full ID-val set
    t_lo, t_hi = _interval(boot)
    r_lo, r_hi = _interval(rates)
    new_lo = new_hi = None
    if n_new > 0:
        new_lo, new_hi = _interval(rng.binomial(n_new, rates) / n_new)
    return OODThreshold(t, t_lo, t_hi, float(target_tpr), float(np.mean(s < t)), r_lo, r_hi, n, int(n_boot), int(seed),
                        int(n_new), new_lo, new_hi)


# --- wrong-prediction risk: flag = risk ≥ t ----------------------------------------------------


def threshold_at_recall_wrong(wrong, risk, recall: float) -> float:
    """The **largest** t with recall(wrong) = #{risk ≥ t | wrong}/n_wrong ≥ ``recall``: the
    m-th largest risk of the wrong predictions, m = ⌈recall·n_wrong⌉ (at least 1; the product
    rounded to 9 decimals first)."""
    wrong = np.asarray(wrong, bool)
    r = np.sort(np.asarray(risk, np.float64)[wrong])[::-1]
    if len(r) == 0:
        raise ValueError("no wrong predictions to set a recall target on")
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    m = max(1, math.ceil(round(recall * len(r), 9)))
    return float(r[m - 1])


@dataclass
class RiskThreshold:
    """A wrong-prediction threshold fitted on val: flag = risk ≥ ``threshold``.

    ``rule``: ``recall_correct`` (:func:`oodlib.metrics.threshold_at_recall_correct` at ``target_recall``
    = the share of correct predictions kept), ``equal_recall`` (:func:`oodlib.metrics.equal_recall_threshold`) or ``recall_wrong``
    (:func:`threshold_at_recall_wrong` at ``target_recall``). ``recall_wrong``/``recall_correct``
    (:func:`oodlib.metrics.recalls_at`) and ``flag_rate`` (share of val flagged) are on the full
    val split; each ``*_lo/hi`` pair is the 2.5/97.5 percentile over the bootstrap thresholds (the
    threshold refitted on each resample, the quantity then evaluated on the full val split;
    resamples with only one class are skipped: ``n_boot_used``).
    """

    threshold: float
    threshold_lo: float
    threshold_hi: float
    rule: str
    target_recall: float | None
    recall_wrong: float
    recall_wrong_lo: float
    recall_wrong_hi: float
    recall_correct: float
    flag_rate: float
    flag_rate_lo: float
    flag_rate_hi: float
    n: int
    n_wrong: int
    n_boot: int
    n_boot_used: int
    seed: int

    def flag(self, risk) -> np.ndarray:
        """Boolean (N,): risk ≥ threshold (flagged likely wrong)."""
        return np.asarray(risk, np.float64) >= self.threshold

    def to_dict(self) -> dict:
        return asdict(self)


def risk_threshold(val_risk, val_wrong, recall: float | None = None, n_boot: int = 1000, seed: int = 0,
                   keep_correct: float | None = None) -> RiskThreshold:
    """Fit the wrong-prediction threshold on val risks (N,) and wrong labels (N,) (1 = the model's
    prediction is wrong). ``recall``: the largest threshold reaching that recall of wrong
    predictions; ``keep_correct``: the lowest threshold leaving that share of the correct
    predictions unflagged (:func:`oodlib.metrics.threshold_at_recall_correct`; the risk's
    counterpart of the OOD threshold's 95% TPR); neither: the equal-recall threshold. See
    :class:`RiskThreshold`."""
    if recall is not None and keep_correct is not None:
        raise ValueError("give recall or keep_correct, not both")
    r = _finite(val_risk, "val risk")
    wrong = np.asarray(val_wrong).ravel()
    if len(wrong) != len(r):
        raise ValueError(f"{len(r)} risks but {len(wrong)} wrong labels")
    wrong = wrong.astype(bool)
    if wrong.all() or not wrong.any():
        raise ValueError("a risk threshold needs both correct and wrong predictions on val")

    def fit(w: np.ndarray, x: np.ndarray) -> float:
        if keep_correct is not None:
            return threshold_at_recall_correct(w, x, keep_correct)
        return equal_recall_threshold(w, x) if recall is None else threshold_at_recall_wrong(w, x, recall)

    t = fit(wrong, r)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(r), size=len(r))
        w = wrong[idx]
        if w.all() or not w.any():
            continue
        boot.append(fit(w, r[idx]))
    if not boot:
        raise ValueError("every bootstrap resample had a single class; too few wrong predictions")
    boot_t = np.asarray(boot)
    sorted_r, sorted_w = np.sort(r), np.sort(r[wrong])
    # shares with risk ≥ t_b on the full val split (t_b may be +inf: nothing flagged)
    flag_rates = 1.0 - np.searchsorted(sorted_r, boot_t, side="left") / len(r)
    recalls = 1.0 - np.searchsorted(sorted_w, boot_t, side="left") / len(sorted_w)
    at = recalls_at(wrong, r, t)
    return RiskThreshold(
        threshold=t, threshold_lo=_interval(boot_t)[0], threshold_hi=_interval(boot_t)[1],
        rule="recall_correct" if keep_correct is not None else "equal_recall" if recall is None else "recall_wrong",
        target_recall=float(keep_correct) if keep_correct is not None else None if recall is None else float(recall),
        recall_wrong=at["recall_wrong"], recall_wrong_lo=_interval(recalls)[0], recall_wrong_hi=_interval(recalls)[1],
        recall_correct=at["recall_correct"], flag_rate=float(np.mean(r >= t)),
        flag_rate_lo=_interval(flag_rates)[0], flag_rate_hi=_interval(flag_rates)[1],
        n=len(r), n_wrong=int(wrong.sum()), n_boot=int(n_boot), n_boot_used=len(boot), seed=int(seed),
    )


# --- the primary detectors ---------------------------------------------------------------------


@dataclass
class PrimaryChoice:
    """The detectors whose scores make the verdict, and why (one sentence each).

    ``risk`` is None when the metrics hold no wrong-prediction rows (the errors stage is off)."""

    ood: str
    ood_value: float
    ood_reason: str
    risk: str | None
    risk_value: float | None
    risk_reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _ranked(rows: pd.DataFrame) -> pd.Series:
    """Value per method, best first (higher value, then method name for ties)."""
    values = rows.groupby("method")["value"].mean()
    order = sorted(values.index, key=lambda m: (-values[m], m))
    return values[order]


def choose_primary(metrics: pd.DataFrame, ood_metric: str = "auroc", error_metric: str = "auroc",
                   error_dataset: str = "val", exclude: tuple[str, ...] = ()) -> PrimaryChoice:
    """Pick the primary OOD detector and wrong-prediction risk from a long metrics table
    (columns ``task, method, dataset, metric, value``, fractions).

    OOD: the highest ``ood_metric`` on the ``task == "ood"``, ``dataset == "avg"`` rows (the
    unweighted mean over the OOD sets, :func:`oodlib.evaluation.ood_metric_rows`). Risk: the highest
    ``error_metric`` on ``task == "error"``, ``dataset == error_dataset`` (val: the split the
    threshold is fitted on, so the test split stays an honest estimate). Ties go to the
    alphabetically first method. ``exclude``: methods never chosen.
    """
    m = metrics[~metrics.method.isin(exclude)]
    ood = m[(m.task == "ood") & (m.dataset == "avg") & (m.metric == ood_metric)]
    if ood.empty:
        raise ValueError(f"no task='ood', dataset='avg', metric={ood_metric!r} rows to choose the primary detector from")
    ranked = _ranked(ood)
    best = ranked.index[0]
    why = f"{best} has the highest mean {ood_metric.upper()} over the OOD sets ({100 * ranked.iloc[0]:.1f}%)"
    if len(ranked) > 1:
        why += f", ahead of {ranked.index[1]} ({100 * ranked.iloc[1]:.1f}%) among {len(ranked)} detectors"
    fpr = m[(m.task == "ood") & (m.dataset == "avg") & (m.metric == "fpr95") & (m.method == best)]
    if not fpr.empty:
        why += f"; its mean FPR@95%TPR is {100 * fpr.value.iloc[0]:.1f}%"
    err = m[(m.task == "error") & (m.dataset == error_dataset) & (m.metric == error_metric)]
    if err.empty:
        return PrimaryChoice(best, float(ranked.iloc[0]), why + ".", None, None,
                             f"no wrong-prediction detector was evaluated on {error_dataset}.")
    r_ranked = _ranked(err)
    r_best = r_ranked.index[0]
    r_why = f"{r_best} has the highest {error_dataset} {error_metric.upper()} for wrong predictions ({100 * r_ranked.iloc[0]:.1f}%)"
    if len(r_ranked) > 1:
        r_why += f", ahead of {r_ranked.index[1]} ({100 * r_ranked.iloc[1]:.1f}%) among {len(r_ranked)} risks"
    return PrimaryChoice(best, float(ranked.iloc[0]), why + ".", r_best, float(r_ranked.iloc[0]), r_why + ".")
