"""Metrics against hand-computed cases, brute-force definitions and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodlib import metrics as M


def brute_fpr95_oodpos(s_id, s_ood, tpr=0.95):
    """Definition: OOD positive, risk = −score; scan thresholds from high risk down; FPR on ID at
    the first one whose TPR on OOD ≥ 0.95 (flagged = risk ≥ t)."""
    r_id, r_ood = -np.asarray(s_id, float), -np.asarray(s_ood, float)
    for t in np.sort(np.unique(np.r_[r_id, r_ood]))[::-1]:
        if np.mean(r_ood >= t) >= tpr:
            return float(np.mean(r_id >= t))
    raise AssertionError


def test_fpr95_hand_computed_with_ties():
    s_id = np.arange(1, 21, dtype=float)  # 20 ID scores; t = sorted[round(1.0)] = 2
    assert M.fpr_at_95_tpr(s_id, [1.0, 2.0, 2.5, 3.0]) == 0.5  # the OOD score equal to t is rejected
    assert M.fpr_at_95_tpr(s_id, [0.0, 1.0]) == 0.0
    assert M.fpr_at_95_tpr(s_id, [30.0]) == 1.0


def test_fpr95_small_n_rounding():
    # N = 10: round(0.5) = 0 (banker's rounding) → t = min ID score
    s_id = np.arange(10, dtype=float)
    assert M.fpr_at_95_tpr(s_id, [-1.0, 0.0, 0.5]) == pytest.approx(1 / 3)
    # N = 30: round(1.5) = 2 → t = sorted[2] = 2
    s_id = np.arange(30, dtype=float)
    assert M.fpr_at_95_tpr(s_id, [1.5, 2.0, 2.1]) == pytest.approx(1 / 3)


def test_fpr95_oodpos_hand_computed():
    s_id = np.array([0.9, 0.8, 0.7, 0.6])
    # TPR 0.95 on 4 OOD needs all 4 flagged: flag every score ≤ 0.65 → of ID only 0.6 is flagged
    s_ood = np.array([0.1, 0.2, 0.3, 0.65])
    assert M.fpr_at_95_tpr_ood_positive(s_id, s_ood) == pytest.approx(0.25)
    # flag every score ≤ 0.85 → ID 0.8, 0.7, 0.6 flagged
    s_ood = np.array([0.1, 0.2, 0.3, 0.85])
    assert M.fpr_at_95_tpr_ood_positive(s_id, s_ood) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_fpr95_oodpos_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_id = rng.integers(0, 20, 37).astype(float)  # heavy ties
    s_ood = rng.integers(-5, 12, 23).astype(float)
    assert M.fpr_at_95_tpr_ood_positive(s_id, s_ood) == pytest.approx(brute_fpr95_oodpos(s_id, s_ood))


def test_two_conventions_differ_and_both_reported():
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.normal(1.0, 1.0, 1000), rng.normal(-0.5, 1.2, 400)
    m = M.ood_metrics(s_id, s_ood)
    assert set(m) == set(M.OOD_METRICS)
    assert m["fpr95"] != pytest.approx(m["fpr95_oodpos"], abs=1e-3)
    # direct definitions
    t = np.sort(s_id)[50]
    assert m["fpr95"] == pytest.approx(np.mean(s_ood > t))
    assert m["fpr95_oodpos"] == pytest.approx(brute_fpr95_oodpos(s_id, s_ood))


def test_auroc_aupr_against_sklearn():
    rng = np.random.default_rng(1)
    s_id, s_ood = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    m = M.ood_metrics(s_id, s_ood)
    y = np.r_[np.ones(200), np.zeros(150)]
    s = np.r_[s_id, s_ood]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["auroc"] == pytest.approx(roc_auc_score(1 - y, -s))  # same with OOD positive on −score
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s))
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s))
    # Mann–Whitney form of AUROC
    assert m["auroc"] == pytest.approx(np.mean(s_id[:, None] > s_ood[None, :]))


def test_perfect_and_inverted_detectors():
    m = M.ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert (m["fpr95"], m["fpr95_oodpos"], m["auroc"], m["aupr_in"], m["aupr_out"]) == (0.0, 0.0, 1.0, 1.0, 1.0)
    m = M.ood_metrics([1.0, 2.0], [5.0, 6.0, 7.0])
    assert m["fpr95"] == 1.0 and m["fpr95_oodpos"] == 1.0 and m["auroc"] == 0.0


def test_bad_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        M.ood_metrics([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="need ID and OOD"):
        M.ood_metrics([], [0.0])


def test_head_tail_accuracy():
    counts = np.array([5, 50, 20, 1])  # sorted by count: 1, 2 head; 0, 3 tail
    labels = np.array([0, 1, 2, 3, 1, 2])
    preds = np.array([0, 1, 0, 0, 1, 2])
    out = M.head_tail_accuracy(labels, preds, counts)
    assert out["acc_head"] == pytest.approx(3 / 4)
    assert out["acc_tail"] == pytest.approx(1 / 2)


def test_equal_recall_threshold_hand_computed():
    wrong = np.array([0, 0, 0, 0, 1, 1])
    risk = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.9])
    t = M.equal_recall_threshold(wrong, risk)
    # t = 0.6: recall_wrong = 1, recall_correct = 3/4 → gap 0.25; t = 0.7: 1/2 vs 3/4 → gap .25, lower mean
    # t = 0.9: 1/2 vs 1 → .5. Best gap 0.25, highest mean recall → 0.6.
    assert t == pytest.approx(0.6)
    r = M.recalls_at(wrong, risk, t)
    assert r == {"recall_correct": 0.75, "recall_wrong": 1.0}


def test_equal_recall_threshold_is_optimal_brute_force():
    rng = np.random.default_rng(3)
    wrong = rng.random(300) < 0.2
    risk = rng.normal(wrong.astype(float), 1.0)
    t = M.equal_recall_threshold(wrong, risk)
    r = M.recalls_at(wrong, risk, t)
    gaps = [abs(np.subtract(*M.recalls_at(wrong, risk, c).values())) for c in np.unique(risk)]
    assert abs(r["recall_correct"] - r["recall_wrong"]) == pytest.approx(min(gaps))


def test_threshold_at_recall_correct():
    wrong = np.array([0] * 100 + [1] * 10)
    risk = np.r_[np.arange(100) / 100.0, np.full(10, 2.0)]
    t = M.threshold_at_recall_correct(wrong, risk, 0.98)
    assert M.recalls_at(wrong, risk, t)["recall_correct"] >= 0.98
    assert t == pytest.approx(0.98)  # risk < 0.98 keeps exactly 98 correct predictions


def test_error_auroc_wrong_positive():
    assert M.error_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.error_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
