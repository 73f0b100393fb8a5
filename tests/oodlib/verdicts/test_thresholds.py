"""Thresholds: the quantile convention, the bootstrap intervals, the risk rules, the primary choice."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from oodlib.metrics import equal_recall_threshold, fpr_at_95_tpr, recalls_at
from oodlib.verdicts import (
    choose_primary,
    ood_threshold,
    risk_threshold,
    threshold_at_recall_wrong,
)

# --- OOD threshold: flag = score < t ----------------------------------------------------------


def test_hand_case_twenty_scores():
    thr = ood_threshold(np.arange(1.0, 21.0), 0.95, n_boot=50)
    assert thr.threshold == 2.0  # k = ⌊0.05·20⌋ = 1 → the 2nd smallest
    assert thr.id_flag_rate == 0.05  # only the score 1 is < 2
    assert list(thr.flag([1.0, 1.999, 2.0, 3.0])) == [True, True, False, False]  # flag = score < t; t itself is kept


def test_hand_case_fractional_rank_keeps_at_least_target():
    # (1 − 0.95)·30 = 1.5: k = ⌊1.5⌋ = 1 → t = 2nd smallest; 29/30 ≥ 95% kept; the 3rd smallest would keep 28/30 < 95%
    s = np.arange(30.0)
    thr = ood_threshold(s, 0.95, n_boot=50)
    assert thr.threshold == 1.0
    assert np.mean(s >= thr.threshold) == pytest.approx(29 / 30)
    # fpr_at_95_tpr rounds 1.5 to k = 2 (keeps 28/30): the two conventions differ here
    ood = np.array([1.5])
    assert fpr_at_95_tpr(s, ood) == 0.0 and np.mean(ood > thr.threshold) == 1.0


@pytest.mark.parametrize("n", [20, 100, 1000, 1001, 37])
@pytest.mark.parametrize("tpr", [0.8, 0.9, 0.95, 0.99])
def test_threshold_is_the_largest_keeping_target(n, tpr):
    rng = np.random.default_rng(n)
    s = np.round(rng.normal(size=n), 1)  # ties on purpose
    t = ood_threshold(s, tpr, n_boot=20).threshold
    assert np.sum(s >= t) >= tpr * n - 1e-9
    larger = s[s > t]
    if len(larger):
        assert np.sum(s >= larger.min()) < tpr * n


@pytest.mark.parametrize("n", [20, 100, 1000, 2000])
def test_matches_fpr95_when_the_rank_is_an_integer(n):
    rng = np.random.default_rng(1)
    s_id, s_ood = rng.normal(size=n), rng.normal(-1, 1, size=500)
    t = ood_threshold(s_id, 0.95, n_boot=20).threshold
    assert fpr_at_95_tpr(s_id, s_ood) == np.mean(s_ood > t)


def test_full_tpr_flags_nothing():
    thr = ood_threshold([3.0, 1.0, 2.0], 1.0, n_boot=20)
    assert thr.threshold == 1.0 and thr.id_flag_rate == 0.0


def test_large_id_sample_flag_rate_interval():
    rng = np.random.default_rng(0)
    s = rng.normal(size=20_000)
    thr = ood_threshold(s, 0.95, n_boot=400, seed=0)
    assert thr.id_flag_rate == pytest.approx(0.05)
    assert thr.id_flag_rate_lo <= 0.05 <= thr.id_flag_rate_hi
    assert thr.id_flag_rate_hi - thr.id_flag_rate_lo < 0.01  # ≈ 2·1.96·√(0.05·0.95/20000) = 0.006
    assert thr.threshold_lo <= norm.ppf(0.05) <= thr.threshold_hi
    assert thr.id_flag_rate_lo <= norm.cdf(thr.threshold) <= thr.id_flag_rate_hi  # the true ID flag rate at t
    fresh = rng.normal(size=200_000)
    assert thr.id_flag_rate_lo <= np.mean(thr.flag(fresh)) <= thr.id_flag_rate_hi


def test_bootstrap_interval_coverage():
    """Over repeated ID-val draws the intervals contain the true quantile and the true flag rate
    at the fitted threshold about 95% of the time."""
    rng = np.random.default_rng(7)
    hit_t = hit_rate = 0
    reps = 150
    for r in range(reps):
        thr = ood_threshold(rng.normal(size=400), 0.95, n_boot=300, seed=r)
        hit_t += thr.threshold_lo <= norm.ppf(0.05) <= thr.threshold_hi
        hit_rate += thr.id_flag_rate_lo <= norm.cdf(thr.threshold) <= thr.id_flag_rate_hi
    assert hit_t / reps >= 0.88 and hit_rate / reps >= 0.88


def test_predictive_interval_for_a_fresh_id_sample_covers_its_flag_rate():
    """Over repeated (val, test) draws the predictive interval holds the test split's flag rate
    ≥ ~95% of the time, where the val-only bootstrap interval does not (it ignores the test's own
    sampling noise)."""
    rng = np.random.default_rng(11)
    hit_new = hit_val_only = 0
    reps = 150
    for r in range(reps):
        thr = ood_threshold(rng.normal(size=300), 0.95, n_boot=300, seed=r, n_new=300)
        rate = np.mean(thr.flag(rng.normal(size=300)))
        hit_new += thr.new_flag_rate_lo <= rate <= thr.new_flag_rate_hi
        hit_val_only += thr.id_flag_rate_lo <= rate <= thr.id_flag_rate_hi
    assert hit_new / reps >= 0.9 and hit_val_only / reps < hit_new / reps
    assert ood_threshold(rng.normal(size=50), n_boot=20).new_flag_rate_lo is None  # not asked for


def test_seeded_and_chunked():
    s = np.random.default_rng(3).normal(size=500)
    a, b = ood_threshold(s, n_boot=300, seed=5), ood_threshold(s, n_boot=300, seed=5)
    assert a == b
    assert ood_threshold(s, n_boot=300, seed=6) != a
    import oodlib.verdicts.thresholds as th

    old = th._CHUNK_VALUES
    try:
        th._CHUNK_VALUES = 1_000  # two rows per chunk: the same draws in the same order
        assert ood_threshold(s, n_boot=300, seed=5) == a
    finally:
        th._CHUNK_VALUES = old


@pytest.mark.parametrize("bad", [[1.0, np.nan], []])
def test_rejects_bad_scores(bad):
    with pytest.raises(ValueError):
        ood_threshold(bad)


def test_rejects_bad_tpr():
    with pytest.raises(ValueError):
        ood_threshold([1.0, 2.0], target_tpr=0.0)


# --- risk threshold: flag = risk ≥ t -----------------------------------------------------------


def _risk_data(seed=0, n=600):
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < 0.2
    risk = rng.normal(size=n) + 1.5 * wrong
    return risk, wrong


def test_default_is_equal_recall_and_matches_recalls_at():
    risk, wrong = _risk_data()
    rt = risk_threshold(risk, wrong, n_boot=100)
    assert rt.rule == "equal_recall" and rt.threshold == equal_recall_threshold(wrong, risk)
    at = recalls_at(wrong, risk, rt.threshold)
    assert rt.recall_wrong == at["recall_wrong"] == np.mean(rt.flag(risk)[wrong])
    assert rt.recall_correct == at["recall_correct"]
    assert rt.flag_rate == np.mean(risk >= rt.threshold)
    assert rt.threshold_lo <= rt.threshold <= rt.threshold_hi
    assert rt.recall_wrong_lo <= rt.recall_wrong <= rt.recall_wrong_hi
    assert rt.flag_rate_lo <= rt.flag_rate <= rt.flag_rate_hi


def test_flag_includes_the_threshold_itself():
    rt = risk_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=50)
    assert rt.threshold == 0.8
    assert list(rt.flag([0.79, 0.8, 0.81])) == [False, True, True]


def test_recall_wrong_hand_cases():
    wrong = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    risk = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.65])
    assert threshold_at_recall_wrong(wrong, risk, 0.6) == 0.7  # 0.6·5 = 3 (not 3.0000000000000004 → 4)
    assert threshold_at_recall_wrong(wrong, risk, 0.61) == 0.6  # ⌈3.05⌉ = 4
    assert threshold_at_recall_wrong(wrong, risk, 1.0) == 0.5
    assert threshold_at_recall_wrong(wrong, risk, 0.01) == 0.9
    rt = risk_threshold(risk, wrong, recall=0.6, n_boot=50)
    assert rt.rule == "recall_wrong" and rt.target_recall == 0.6 and rt.threshold == 0.7
    assert rt.recall_wrong == pytest.approx(0.6)


def test_risk_threshold_seeded():
    risk, wrong = _risk_data(1, 200)
    assert risk_threshold(risk, wrong, n_boot=100, seed=3) == risk_threshold(risk, wrong, n_boot=100, seed=3)


def test_risk_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        risk_threshold([0.1, 0.2], [0, 0])


def test_rare_wrong_skips_single_class_resamples():
    risk = np.linspace(0, 1, 30)
    wrong = np.zeros(30, bool)
    wrong[-1] = True
    rt = risk_threshold(risk, wrong, n_boot=200, seed=0)
    assert rt.n_boot_used < 200 and rt.n_boot_used > 0


# --- the primary detectors --------------------------------------------------------------------


def _metrics():
    rows = []
    for method, auroc, fpr in (("msp", 0.90, 0.40), ("knn", 0.95, 0.20), ("energy", 0.93, 0.30)):
        for ds in ("digits-near", "noise"):
            rows.append(("ood", method, ds, "auroc", auroc + (0.04 if ds == "noise" else -0.04)))
        rows += [("ood", method, "avg", "auroc", auroc), ("ood", method, "avg", "fpr95", fpr)]
        rows.append(("ood", method, "near", "auroc", 0.99 if method == "msp" else 0.5))  # a group, not the avg
    for method, val, test in (("conductance", 0.80, 0.90), ("lcr", 0.85, 0.70)):
        rows += [("error", method, "val", "auroc", val), ("error", method, "test", "auroc", test)]
    return pd.DataFrame(rows, columns=["task", "method", "dataset", "metric", "value"])


def test_choose_primary():
    c = choose_primary(_metrics())
    assert (c.ood, c.ood_value) == ("knn", 0.95)
    assert "knn" in c.ood_reason and "95.0%" in c.ood_reason and "energy (93.0%)" in c.ood_reason
    assert "FPR@95%TPR is 20.0%" in c.ood_reason
    assert c.risk == "lcr" and c.risk_value == 0.85  # val, not test
    assert "lcr" in c.risk_reason and "conductance (80.0%)" in c.risk_reason


def test_choose_primary_ties_exclude_and_no_errors():
    m = _metrics()
    m.loc[(m.method == "energy") & (m.dataset == "avg") & (m.metric == "auroc"), "value"] = 0.95
    assert choose_primary(m).ood == "energy"  # tie: alphabetical
    assert choose_primary(m, exclude=("energy",)).ood == "knn"
    c = choose_primary(m[m.task == "ood"])
    assert c.risk is None and c.risk_value is None and "no wrong-prediction" in c.risk_reason


def test_choose_primary_needs_avg_rows():
    with pytest.raises(ValueError, match="avg"):
        choose_primary(_metrics().query("dataset != 'avg'"))


def test_keep_correct_hand_case():
    correct = np.round(np.arange(1, 11) / 10, 1)  # 0.1 … 1.0
    risk = np.r_[correct, 0.95, 2.0]
    wrong = np.r_[np.zeros(10, bool), True, True]
    rt = risk_threshold(risk, wrong, n_boot=50, keep_correct=0.9)
    # candidates are the correct predictions' risks: the lowest leaving 9 of the 10 below it is 1.0
    assert rt.rule == "recall_correct" and rt.target_recall == 0.9 and rt.threshold == 1.0
    assert rt.recall_correct == pytest.approx(0.9) and rt.recall_wrong == 0.5  # 2.0 flagged, 0.95 not
    with pytest.raises(ValueError, match="not both"):
        risk_threshold(risk, wrong, recall=0.5, keep_correct=0.9)
