"""The nightly history, alert and MLflow series of :mod:`jobs.report` (pure pandas: no Ray)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs.report import batch_history, batch_metrics, decisions, expected_rate
from oodlib.verdicts import wilson_interval


def batches(rows: list[tuple[str, str, int, int]], c2st: float = 0.5, ks: float = 0.5) -> pd.DataFrame:
    """VERDICTS-like ``batches`` rows from (dataset, batch, n, k), Wilson bounds computed."""
    out = []
    for dataset, batch, n, k in rows:
        lo, hi = wilson_interval(k, n)
        out.append({"dataset": dataset, "batch": batch, "n": n, "k": k, "rate": k / n, "lo": lo, "hi": hi, "ood_rate": k / n / 2,
                    "ood_lo": 0.0, "ood_hi": 1.0, "c2st_p": np.nan if dataset == "digits" else c2st,
                    "ks_p": np.nan if dataset == "digits" else ks, "quarantined": 0})
    return pd.DataFrame(out)


def test_expected_rate_is_the_id_test_row():
    b = batches([("digits", "", 400, 20), ("prod", "2026-11-30", 100, 9)])
    rate, lo, hi = expected_rate(b, "digits")
    assert rate == 0.05 and (lo, hi) == wilson_interval(20, 400)
    with pytest.raises(ValueError, match="no ID test row for 'cifar10'"):
        expected_rate(b, "cifar10")


def test_history_keeps_earlier_nights_and_replaces_reassessed_batches():
    first = batch_history(None, batches([("digits", "", 400, 20), ("prod", "2026-11-29", 100, 5), ("prod", "2026-11-30", 100, 6)]),
                          "digits", "run1")
    assert list(first.batch) == ["2026-11-29", "2026-11-30"] and set(first.oodlib_run_id) == {"run1"}
    assert first.expected_rate.tolist() == [0.05, 0.05]  # the ID row is the expectation, not a batch
    second = batch_history(first, batches([("digits", "", 400, 40), ("prod", "2026-11-30", 100, 30), ("prod", "2026-12-01", 100, 50)]),
                           "digits", "run2")
    assert list(second.batch) == ["2026-11-29", "2026-11-30", "2026-12-01"]
    assert list(second.oodlib_run_id) == ["run1", "run2", "run2"]
    assert list(second.k) == [5, 30, 50]  # 11-30 re-assessed by run 2: its row replaced, not duplicated
    assert list(second.expected_rate) == [0.05, 0.1, 0.1]  # each row keeps the expectation it was judged against


def test_decision_fires_on_the_newest_batch_only_when_its_lower_bound_clears_the_margin():
    id_row = ("digits", "", 1000, 50)  # expected 5%, Wilson hi ≈ 6.5%
    calm = batch_history(None, batches([id_row, ("prod", "2026-11-29", 120, 6), ("prod", "2026-11-30", 120, 8)]), "digits", "r")
    d = decisions(calm, margin=0.02, alpha=0.01)["prod"]
    assert [x.batch for x in d] == ["2026-11-29", "2026-11-30"] and not d[-1].fire
    hot = batch_history(calm, batches([id_row, ("prod", "2026-12-01", 120, 40)]), "digits", "r2")
    newest = decisions(hot, margin=0.02, alpha=0.01)["prod"][-1]
    lo = wilson_interval(40, 120)[0]
    assert newest.batch == "2026-12-01" and newest.fire and newest.rate_fires
    assert newest.lo == pytest.approx(lo) and lo - wilson_interval(50, 1000)[1] > 0.02
    assert newest.rising == 2  # 5% → 6.7% → 33%


def test_drift_alone_fires_below_the_bonferroni_level():
    id_row = ("digits", "", 1000, 50)
    h = batch_history(None, batches([id_row, ("prod", "2026-12-01", 120, 6)], c2st=0.004, ks=0.9), "digits", "r")
    d = decisions(h, margin=0.02, alpha=0.01)["prod"][-1]
    assert d.fire and d.drift_fires and not d.rate_fires  # 0.004 < 0.01 / 2
    h = batch_history(None, batches([id_row, ("prod", "2026-12-01", 120, 6)], c2st=0.006, ks=0.9), "digits", "r")
    assert not decisions(h, margin=0.02, alpha=0.01)["prod"][-1].fire  # 0.006 ≥ 0.005


def test_batch_metrics_are_stepped_by_date_and_skip_missing_values():
    h = batch_history(None, batches([("digits", "", 400, 20), ("prod", "2026-11-30", 100, 9), ("prod", "not-a-date", 100, 1)]),
                      "digits", "r")
    series = batch_metrics(h)
    steps = {s for _, _, s in series}
    assert steps == {20261130}
    values = {k: v for k, v, _ in series}
    assert values["batch.prod.rate"] == pytest.approx(0.09) and values["batch.prod.c2st_p"] == 0.5
    h.loc[0, "ks_p"] = np.nan
    assert "batch.prod.ks_p" not in {k for k, _, _ in batch_metrics(h)}


def test_primary_is_never_a_detector_fitted_on_the_calibration_split():
    from jobs.config import parse_config
    from jobs.stages.verdicts import primary_choice

    rows = [("ood", m, "avg", "auroc", v) for m, v in (("residual", 0.99), ("knn", 0.9), ("msp", 0.8))]
    rows += [("error", m, "val", "auroc", v) for m, v in (("conductance", 0.85), ("lcr", 0.8))]
    metrics = pd.DataFrame(rows, columns=["task", "method", "dataset", "metric", "value"])
    cfg = parse_config({"experiment": "x", "data": {"source": "digits"}, "errors": {"enabled": True}, "verdicts": {"enabled": True}})
    chosen = primary_choice(cfg, metrics, ["residual"])
    assert chosen["ood"] == "knn" and chosen["risk"] == "conductance"
    assert primary_choice(cfg, metrics)["ood"] == "residual"
    cfg = parse_config({"experiment": "x", "data": {"source": "digits"}, "detectors": ["msp", "residual"],
                        "verdicts": {"enabled": True, "primary_detector": "residual"}})
    assert primary_choice(cfg, metrics, ["residual"])["ood"] == "residual"  # configured: the user's call
    assert "configured" in primary_choice(cfg, metrics, ["residual"])["why"][0]
