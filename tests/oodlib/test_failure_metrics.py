"""Failure-detection metrics (FD-Shifts conventions) against hand-computed cases, closed forms,
scikit-learn and NumPy transcriptions of fd-shifts@c4467ae (``fd_shifts/analysis``)."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from oodlib import metrics as M


# --- transcriptions of fd-shifts (rc_stats_utils.py, metrics.py), loops kept as they are ---------


def fd_selective_risk_stats(confids, residuals):
    n = len(residuals)
    idx_sorted = np.argsort(confids)
    residuals, confidence = residuals[idx_sorted], confids[idx_sorted]
    cov, selective_risk_norm, error_sum = n, n, sum(residuals)
    coverages, risks = [1.0], [error_sum / cov]
    for i in range(n - 1):
        cov -= 1
        selective_risk_norm -= 1
        error_sum -= residuals[i]
        if confidence[i] != confidence[i + 1]:
            coverages.append(cov / n)
            risks.append(error_sum / selective_risk_norm)
    coverages.append(0)
    risks.append(risks[-1])
    return np.array(coverages), np.array(risks)


def fd_generalized_risk_stats(confids, residuals):
    n = len(residuals)
    idx_sorted = np.argsort(confids)
    residuals, confidence = residuals[idx_sorted], confids[idx_sorted]
    cov, error_sum = n, sum(residuals)
    coverages, risks = [1.0], [error_sum / n]
    for i in range(n - 1):
        cov -= 1
        error_sum -= residuals[i]
        if confidence[i] != confidence[i + 1]:
            coverages.append(cov / n)
            risks.append(error_sum / n)
    coverages.append(0)
    risks.append(0)
    return np.array(coverages), np.array(risks)


def fd_auc(coverages, risks):
    """``evaluate_auc`` with linear interpolation (÷ AUC_DISPLAY_SCALE: a fraction)."""
    return -np.trapezoid(risks, coverages)


def fd_aurc_optimal(residuals):
    err = np.mean(residuals)
    return err + (1 - err) * (np.log(1 - err + np.finfo(err.dtype).eps))


def fd_fpr_at_95_tpr(confids, correct):
    fpr, tpr, _ = roc_curve(correct, confids)
    return np.min(fpr[np.argwhere(tpr >= 0.9495)])


def fd_ece(confids, correct, n_bins=20):
    """``calibration_stats`` + ``expected_calibration_error``."""
    y_prob = np.clip(confids, 0, 1)
    y_true = np.asarray(correct, int)
    bins = np.linspace(0.0, 1.0 + 1e-8, n_bins + 1)
    binids = np.digitize(y_prob, bins) - 1
    bin_sums = np.bincount(binids, weights=y_prob, minlength=len(bins))
    bin_true = np.bincount(binids, weights=y_true, minlength=len(bins))
    bin_total = np.bincount(binids, minlength=len(bins))
    nonzero = bin_total != 0
    prob_true = bin_true[nonzero] / bin_total[nonzero]
    prob_pred = bin_sums[nonzero] / bin_total[nonzero]
    prob_total = bin_total[nonzero] / bin_total.sum()
    return np.dot(np.abs(prob_true - prob_pred), prob_total)


def _data(seed, n=300, ties=False, acc=0.75):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < acc
    k = rng.normal(correct * 1.0, 1.0)
    if ties:
        k = np.round(k * 2) / 2  # heavy plateaus
    return k, correct


# --- hand-computed -------------------------------------------------------------------------------


def test_rc_curve_hand_computed_with_ties():
    # sorted ascending: 0.1 (fail), 0.2 (ok), 0.2 (fail), 0.9 (ok); the two 0.2s leave together
    k = np.array([0.2, 0.9, 0.1, 0.2])
    correct = np.array([True, True, False, False])
    curve = M.rc_curve(k, correct)
    np.testing.assert_allclose(curve["coverage"], [1, 0.75, 0.25, 0])
    np.testing.assert_allclose(curve["selective_risk"], [0.5, 1 / 3, 0, 0])
    np.testing.assert_allclose(curve["generalized_risk"], [0.5, 0.25, 0, 0])
    np.testing.assert_allclose(curve["threshold"], [0.1, 0.2, 0.9])
    assert M.aurc(k, correct) == pytest.approx(0.25 * (0.5 + 1 / 3) / 2 + 0.5 * (1 / 3) / 2)  # 0.1875
    assert M.augrc(k, correct) == pytest.approx(0.25 * 0.75 / 2 + 0.5 * 0.25 / 2)  # 0.15625
    assert M.auroc_f(k, correct) == pytest.approx(3.5 / 4)  # the tied pair counts ½
    assert M.fpr95_f(k, correct) == pytest.approx(0.5)  # accepting both correct ones accepts the failure at 0.2
    assert M.aurc_optimal(correct) == pytest.approx(0.5 + 0.5 * np.log(0.5))


def test_rc_curve_all_tied_and_single_class():
    k, correct = np.ones(5), np.array([1, 0, 1, 1, 0], bool)
    curve = M.rc_curve(k, correct)
    np.testing.assert_allclose(curve["coverage"], [1, 0])
    np.testing.assert_allclose(curve["selective_risk"], [0.4, 0.4])
    assert M.aurc(k, correct) == pytest.approx(0.4) and M.augrc(k, correct) == pytest.approx(0.2)
    assert np.isnan(M.auroc_f(k, np.ones(5, bool))) and np.isnan(M.fpr95_f(k, np.zeros(5, bool)))
    assert M.aurc(np.arange(5.0), np.ones(5, bool)) == 0 and M.aurc_optimal(np.ones(5, bool)) == 0
    assert M.aurc_optimal(np.zeros(5, bool)) == 1  # err = 1: the (1 − err)·ln term is 0


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="empty"):
        M.aurc([], [])
    with pytest.raises(ValueError, match="NaN"):
        M.aurc([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="boolean"):
        M.aurc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="labels"):
        M.aurc([0.1, 0.2], [True])


# --- against fd-shifts' code ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_curves_and_areas_match_fd_shifts(seed, ties):
    k, correct = _data(seed, ties=ties)
    r = (~correct).astype(float)
    curve = M.rc_curve(k, correct)
    cov, risk = fd_selective_risk_stats(k, r)
    np.testing.assert_allclose(curve["coverage"], cov)
    np.testing.assert_allclose(curve["selective_risk"], risk)
    cov_g, risk_g = fd_generalized_risk_stats(k, r)
    np.testing.assert_allclose(curve["generalized_risk"], risk_g)
    assert M.aurc(k, correct) == pytest.approx(fd_auc(cov, risk), abs=1e-12)
    assert M.augrc(k, correct) == pytest.approx(fd_auc(cov_g, risk_g), abs=1e-12)
    assert M.e_aurc(k, correct) == pytest.approx(fd_auc(cov, risk) - fd_aurc_optimal(r), abs=1e-12)
    assert M.auroc_f(k, correct) == pytest.approx(roc_auc_score(correct, k), abs=1e-12)
    if not ties:  # roc_curve's drop_intermediate can only matter on collinear points
        assert M.fpr95_f(k, correct) == pytest.approx(fd_fpr_at_95_tpr(k, correct), abs=1e-12)
    else:  # every threshold is a candidate here: never larger than fd-shifts'
        assert M.fpr95_f(k, correct) <= fd_fpr_at_95_tpr(k, correct) + 1e-12
    p = 1 / (1 + np.exp(-k))
    assert M.ece(p, correct) == pytest.approx(fd_ece(p, correct), abs=1e-12)


def test_fpr95_f_is_min_over_every_threshold():
    k, correct = _data(7, n=200, ties=True)
    best = min(np.mean(k[~correct] >= t) for t in np.unique(k) if np.mean(k[correct] >= t) >= 0.9495)
    assert M.fpr95_f(k, correct) == pytest.approx(best)


# --- closed forms and invariants -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_augrc_identity_for_untied_scores(seed):
    k, correct = _data(seed, n=400, acc=0.6 + 0.05 * seed)
    acc = correct.mean()
    expected = (1 - M.auroc_f(k, correct)) * acc * (1 - acc) + 0.5 * (1 - acc) ** 2
    assert M.augrc(k, correct) == pytest.approx(expected, abs=1e-12)


def test_optimal_rankings():
    rng = np.random.default_rng(0)
    n = 500
    correct = rng.random(n) < 0.8
    k = rng.random(n) + correct  # every failure below every success, untied
    err, a = 1 - correct.mean(), correct.mean()
    assert M.augrc(k, correct) == pytest.approx(0.5 * err**2, abs=1e-12)  # generalized risk is linear: trapz is exact
    # selective risk 1 − a/c is concave: trapz under-estimates AURC* by at most (1/a − a)/(12 n²)
    assert 0 >= M.e_aurc(k, correct) >= -(1 / a - a) / (12 * n**2) - 1e-12
    # a plateau: all failures tied at 0, all successes at 1 → a straight line from (1, err) to (a, 0)
    k2 = correct.astype(float)
    assert M.aurc(k2, correct) == pytest.approx(0.5 * err * err)
    assert M.e_aurc(k2, correct) < 0  # as fd-shifts warns: plateaus can make E-AURC negative


@pytest.mark.parametrize("seed", range(10))
def test_e_aurc_non_negative_for_untied_scores(seed):
    k, correct = _data(seed, n=150 + 20 * seed, acc=0.5 + 0.04 * seed)
    assert M.e_aurc(k, correct) >= 0
    assert M.aurc(k, correct) >= M.aurc_optimal(correct)


def test_aurc_star_for_binary_residuals():
    for err in (0.0, 0.1, 0.37, 0.9):
        correct = np.arange(1000) >= round(1000 * err)
        assert M.aurc_optimal(correct) == pytest.approx(err + (1 - err) * np.log(1 - err) if err < 1 else 1.0)


def test_ranking_metrics_invariant_to_monotone_maps():
    k, correct = _data(3, ties=True)
    a = M.failure_metrics(k, correct)
    b = M.failure_metrics(np.exp(3 * k) - 7, correct)
    for m in ("aurc", "e_aurc", "augrc", "auroc_f", "fpr95_f"):
        assert a[m] == pytest.approx(b[m], abs=1e-12)
    # and a random guess has AUROC_f ≈ ½, AUGRC ≈ its closed form at AUROC ½
    rng = np.random.default_rng(1)
    correct = rng.random(20000) < 0.7
    k = rng.random(20000)
    assert M.auroc_f(k, correct) == pytest.approx(0.5, abs=0.02)
    assert M.aurc(k, correct) == pytest.approx(1 - correct.mean(), abs=0.01)


def test_ece_perfectly_calibrated_bins_is_zero():
    p = np.r_[np.full(4, 0.25), np.full(10, 0.7), np.full(3, 1.0)]
    correct = np.r_[[1, 0, 0, 0], [1] * 7 + [0] * 3, [1, 1, 1]].astype(bool)
    assert M.ece(p, correct) == pytest.approx(0.0, abs=1e-12)
    assert M.mce(p, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed_and_bins():
    # bin [0.90, 0.95): conf 0.9, acc ½ → gap 0.4, weight ½; bin [0.30, 0.35): conf 0.3, acc 0 → 0.3, weight ½
    p = np.array([0.9, 0.9, 0.3, 0.3])
    correct = np.array([True, False, False, False])
    assert M.ece(p, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)
    assert M.mce(p, correct) == pytest.approx(0.4)
    # equal-width bins of 0.05: 0.31 and 0.34 share a bin (mean conf 0.325), clipping maps 1.2 → 1 and −1 → 0
    assert M.ece([0.31, 0.34], [True, False]) == pytest.approx(abs(0.5 - 0.325))
    assert M.ece([1.2, -1.0], [True, False]) == pytest.approx(0.0)
    assert M.ece([0.31, 0.34], [True, False], n_bins=10) == pytest.approx(abs(0.5 - 0.325))


def test_failure_metrics_bundle_matches_single_functions():
    k, correct = _data(5, ties=True)
    p = 1 / (1 + np.exp(-k))
    got = M.failure_metrics(k, correct, p)
    assert set(got) == set(M.FAILURE_METRICS)
    want = {"aurc": M.aurc(k, correct), "e_aurc": M.e_aurc(k, correct), "augrc": M.augrc(k, correct),
            "auroc_f": M.auroc_f(k, correct), "fpr95_f": M.fpr95_f(k, correct), "ece": M.ece(p, correct)}
    assert got == pytest.approx(want, abs=1e-12)
    assert np.isnan(M.failure_metrics(k, correct)["ece"])
    one_class = M.failure_metrics(k, np.ones(len(k), bool))
    assert one_class["aurc"] == 0 and np.isnan(one_class["auroc_f"]) and np.isnan(one_class["fpr95_f"])
