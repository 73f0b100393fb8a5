"""Evaluating the wrong-prediction detectors: the seed paper's tables, splits, and the full
fit/evaluate.

Thresholds come from the validation split: the equal-recall threshold (recall of correct =
recall of wrong) and, optionally, the threshold at a target recall of correct (e.g. 0.98).

* :func:`error_table` — seed Tables 4–6 (:func:`to_long_metrics`: as ``metrics`` rows);
* :func:`lcr_table` — seed Table 3; :func:`auroc_vs_mutants` — seed Figure 4's curves (the plot:
  :func:`oodlib.reporting.errors.plot_auroc_vs_mutants`);
* :func:`group_split` — fit/val/test by image group;
* :func:`fit_and_evaluate` — the conductance detector, the fusions and LCR alone in one table.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from oodlib.errors.detectors import (
    FUSION_KINDS,
    ConductanceErrorDetector,
    FusionDetector,
    _check_labels,
    out_of_fold_risk,
)
from oodlib.metrics import (
    equal_recall_threshold,
    error_auroc,
    recalls_at,
    threshold_at_recall_correct,
)

SPLITS = ("fit", "val", "test")


# --- evaluation (seed Tables 3–6, Figure 4) -----------------------------------------------------


def error_table(
    risks: dict[str, tuple[np.ndarray, np.ndarray]],
    wrong_val: np.ndarray,
    wrong_test: np.ndarray,
    target_recall_correct: float | None = 0.98,
) -> pd.DataFrame:
    """One row per detector, like seed Tables 4–6.

    ``risks``: {method: (risk on val, risk on test)}. Columns: ``method``, ``val_auroc``,
    ``val_recall_correct``, ``val_recall_wrong``, ``test_auroc``, ``test_recall_correct``,
    ``test_recall_wrong`` at the equal-recall threshold fitted on val (``threshold``); with a
    ``target_recall_correct`` also the same recalls at the threshold reaching that recall of
    correct on val (suffix ``_at_target``, threshold ``threshold_at_target``).
    """
    wrong_val = _check_labels(wrong_val, "the validation split")
    wrong_test = _check_labels(wrong_test, "the test split")
    rows = []
    for method, (r_val, r_test) in risks.items():
        t = equal_recall_threshold(wrong_val, r_val)
        row = {"method": method, "threshold": t}
        for split, w, r in (("val", wrong_val, r_val), ("test", wrong_test, r_test)):
            row[f"{split}_auroc"] = error_auroc(w, r)
            row.update({f"{split}_{k}": v for k, v in recalls_at(w, r, t).items()})
        if target_recall_correct is not None:
            t2 = threshold_at_recall_correct(wrong_val, r_val, target_recall_correct)
            row["threshold_at_target"] = t2
            for split, w, r in (("val", wrong_val, r_val), ("test", wrong_test, r_test)):
                row.update({f"{split}_{k}_at_target": v for k, v in recalls_at(w, r, t2).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def to_long_metrics(table: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """An :func:`error_table` as ``metrics`` rows (task=error, method, dataset, metric, value)."""
    long = table.drop(columns=[c for c in table.columns if c.startswith("threshold")]).melt(
        id_vars="method", var_name="metric", value_name="value"
    )
    return long.assign(task="error", dataset=dataset)[["task", "method", "dataset", "metric", "value"]]


def lcr_table(entries: list[tuple[str, float, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Seed Table 3: LCR mean ± std of correct vs wrong predictions per operator and rate.

    ``entries``: (operator, rate, lcr (N,), wrong (N,)). ``lcr_difference`` is the paper's
    (mean_wrong − std_wrong) − (mean_correct + std_correct).
    """
    rows = []
    for operator, rate, lcr, wrong in entries:
        lcr, wrong = np.asarray(lcr, np.float64), _check_labels(wrong, "lcr_table")
        c, w = lcr[~wrong], lcr[wrong]
        rows.append({
            "operator": operator, "rate": float(rate),
            "correct_mean": c.mean(), "correct_std": c.std(), "wrong_mean": w.mean(), "wrong_std": w.std(),
            "lcr_difference": (w.mean() - w.std()) - (c.mean() + c.std()),
        })
    return pd.DataFrame(rows)


def auroc_vs_mutants(flips: np.ndarray, wrong: np.ndarray, counts: list[int] | None = None) -> pd.DataFrame:
    """Seed Figure 4: AUROC of the LCR over the first m mutants, for m in ``counts``.

    ``flips``: a full flip matrix (N×M bool, no early stop). Default counts: 1, 2, 5, 10, 20, …, M.
    """
    flips = np.asarray(flips, bool)
    wrong = _check_labels(wrong, "auroc_vs_mutants")
    m_total = flips.shape[1]
    if counts is None:
        counts = sorted({c for c in (1, 2, 5, *range(10, m_total + 1, 10), m_total) if c <= m_total})
    cum = np.cumsum(flips, axis=1)
    return pd.DataFrame({"mutants": counts, "auroc": [error_auroc(wrong, cum[:, m - 1] / m) for m in counts]})


# --- splits and the full fit/evaluate ------------------------------------------------------------


def group_split(groups: np.ndarray, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0) -> np.ndarray:
    """Assign every row to ``fit``/``val``/``test`` by its group (N,) → split names (N,).

    All rows of a group (e.g. an image and its corrupted copies) land in the same split, so no
    evaluated image has a near-duplicate in the detector's training rows. A group's split is a
    function of ``(seed, group)`` alone — a hash of both, mapped to [0, 1) and cut by the
    cumulative ``fractions`` — so it does not move when other groups are added or quarantined
    (stages that see different row sets agree, incremental runs keep their splits); the split
    sizes match ``fractions`` up to sampling noise.
    """
    uniq, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest(), "big") / 2.0**64
                  for g in uniq])
    cuts = np.cumsum(fractions)[:-1] / np.sum(fractions)
    return np.asarray(SPLITS)[np.searchsorted(cuts, u, side="right")][inverse.reshape(-1)]


@dataclass
class ErrorDetectionResult:
    """What :func:`fit_and_evaluate` produces: the table, risks per split and method, and the
    fitted detectors (each with ``save()``/``state_dict()``)."""

    table: pd.DataFrame
    risks: dict[str, dict[str, np.ndarray]]
    conductance: ConductanceErrorDetector
    fusions: dict[str, FusionDetector]


def fit_and_evaluate(
    conductance: dict[str, np.ndarray],
    lcr: dict[str, np.ndarray] | None,
    wrong: dict[str, np.ndarray],
    fusion_kinds: tuple[str, ...] = FUSION_KINDS,
    target_recall_correct: float | None = 0.98,
    seed: int = 0,
    **detector_kwargs,
) -> ErrorDetectionResult:
    """Fit every error detector on split ``fit`` and evaluate on ``val`` and ``test``.

    Inputs are dicts keyed by split (``fit``, ``val``, ``test``): conductance vectors (N×K),
    LCR (N,) (None: conductance only) and ``wrong`` labels (N,). The conductance detector
    selects its epoch by val AUROC; the fusions train on [LCR, out-of-fold conductance risk] of
    the fit split. Thresholds are fitted on val. Methods (= risk column suffixes):
    ``conductance``, ``lcr``, ``fusion_nn``, ``fusion_rf``, ``fusion_lda``, ``fusion_qda``.
    """
    det = ConductanceErrorDetector(seed=seed, **detector_kwargs).fit(
        conductance["fit"], wrong["fit"], conductance["val"], wrong["val"]
    )
    risks: dict[str, dict[str, np.ndarray]] = {"conductance": {s: det.risk(conductance[s]) for s in ("val", "test")}}
    fusions: dict[str, FusionDetector] = {}
    if lcr is not None:
        risks["lcr"] = {s: np.asarray(lcr[s], np.float32) for s in ("val", "test")}
        oof = out_of_fold_risk(conductance["fit"], wrong["fit"], seed=seed, **detector_kwargs)
        z_fit = np.column_stack([lcr["fit"], oof])
        for kind in fusion_kinds:
            fusions[kind] = FusionDetector(kind, seed).fit(z_fit, wrong["fit"])
            risks[f"fusion_{kind}"] = {
                s: fusions[kind].risk(np.column_stack([lcr[s], risks["conductance"][s]])) for s in ("val", "test")
            }
    table = error_table(
        {m: (r["val"], r["test"]) for m, r in risks.items()}, wrong["val"], wrong["test"], target_recall_correct
    )
    return ErrorDetectionResult(table, risks, det, fusions)
