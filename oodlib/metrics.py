"""Evaluation metrics with the exact conventions of ``specs/metrics.md``.

OOD scores are ID-confidences (higher = more ID); error risks are higher = more likely wrong.
"""
from __future__ import annotations

import numpy as np

# scikit-learn is imported where it is used: a job whose EVALUATE is reused need not load it

OOD_METRICS = ("fpr95", "fpr95_oodpos", "auroc", "aupr_in", "aupr_out")


def _check_scores(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s_id = np.asarray(id_scores, np.float64).ravel()
    s_ood = np.asarray(ood_scores, np.float64).ravel()
    if len(s_id) == 0 or len(s_ood) == 0:
        raise ValueError(f"need ID and OOD scores, got {len(s_id)} ID and {len(s_ood)} OOD")
    if not (np.isfinite(s_id).all() and np.isfinite(s_ood).all()):
        raise ValueError("scores contain NaN or Inf")
    return s_id, s_ood


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR on OOD at 95% TPR on ID, ID positive (LINE/DICE/KNN convention, the primary ``fpr95``).

    Rule: sort the ID scores ascending; the threshold is t = s_id[round((1 − tpr)·N_id)], so at
    least 95% of ID scores are ≥ t; the FPR is the fraction of OOD scores **strictly greater**
    than t. OOD scores equal to t therefore count as rejected (ties favour the detector only at
    the threshold value itself).
    """
    s_id, s_ood = _check_scores(id_scores, ood_scores)
    # round(1 − tpr, 12): 1 − 0.95 is 0.05000000000000004 in floating point, which would turn
    # round(0.05 · 10) = 0 into 1
    idx = min(int(round(round(1.0 - tpr, 12) * len(s_id))), len(s_id) - 1)
    threshold = np.sort(s_id)[idx]
    return float(np.mean(s_ood > threshold))


def fpr_at_95_tpr_ood_positive(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR on ID at the first ROC threshold where TPR on OOD ≥ 95% (OpenOOD/PASCL ``fpr95_oodpos``).

    OOD is the positive class with risk = −score; uses ``sklearn.metrics.roc_curve``.
    """
    s_id, s_ood = _check_scores(id_scores, ood_scores)
    y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
    # drop_intermediate=False: every threshold is kept, so this is exactly the first threshold
    # (in decreasing risk) whose TPR reaches the target — collinear points are not skipped.
    from sklearn.metrics import roc_curve

    fpr, tpr_curve, _ = roc_curve(y, -np.r_[s_id, s_ood], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr_curve, tpr, side="left")])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """All OOD metrics of one ID set vs one OOD set: fpr95, fpr95_oodpos, auroc, aupr_in, aupr_out.

    AUROC is with ID positive; ``aupr_in`` is average precision with ID positive on the score as
    is, ``aupr_out`` with OOD positive on −score.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s_id, s_ood = _check_scores(id_scores, ood_scores)
    y_id = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
    s = np.r_[s_id, s_ood]
    return {
        "fpr95": fpr_at_95_tpr(s_id, s_ood),
        "fpr95_oodpos": fpr_at_95_tpr_ood_positive(s_id, s_ood),
        "auroc": float(roc_auc_score(y_id, s)),
        "aupr_in": float(average_precision_score(y_id, s)),
        "aupr_out": float(average_precision_score(1 - y_id, -s)),
    }


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Fraction of ``preds`` equal to ``labels``."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(labels == np.asarray(preds)))


def head_tail_accuracy(labels: np.ndarray, preds: np.ndarray, train_counts: np.ndarray) -> dict[str, float]:
    """Long-tailed ID accuracy: overall, on head and tail classes, and by shot.

    Head = the first half of the classes sorted by training count, most frequent first
    (:func:`oodlib.data.longtail.head_classes`), tail = the rest; many/medium/few shot = more
    than 100, 20–100, fewer than 20 training images. Rows with label < 0 are ignored.
    Returns ``acc``, ``acc_head``, ``acc_tail``, ``acc_many``, ``acc_medium``, ``acc_few`` (NaN for
    an empty group).
    """
    from oodlib.data.longtail import head_classes

    labels, preds = np.asarray(labels), np.asarray(preds)
    keep = labels >= 0
    labels, preds = labels[keep], preds[keep]
    counts = np.asarray(train_counts)
    correct = preds == labels
    head = head_classes(counts)[labels]
    shots = counts[labels]
    groups = {"acc": np.ones(len(labels), bool), "acc_head": head, "acc_tail": ~head,
              "acc_many": shots > 100, "acc_medium": (shots >= 20) & (shots <= 100), "acc_few": shots < 20}
    return {k: float(correct[m].mean()) if m.any() else float("nan") for k, m in groups.items()}


# --- wrong-prediction detection (wrong = positive class, risk higher = more likely wrong) ---


def error_auroc(wrong: np.ndarray, risk: np.ndarray) -> float:
    """AUROC of ``risk`` for detecting wrong predictions (``wrong`` = 1)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(wrong, int), np.asarray(risk, np.float64)))


def recalls_at(wrong: np.ndarray, risk: np.ndarray, threshold: float) -> dict[str, float]:
    """Recall of correct (risk < t) and of wrong (risk ≥ t) predictions at threshold ``t``."""
    wrong = np.asarray(wrong, bool)
    risk = np.asarray(risk, np.float64)
    flagged = risk >= threshold
    return {
        "recall_correct": float(np.mean(~flagged[~wrong])) if (~wrong).any() else float("nan"),
        "recall_wrong": float(np.mean(flagged[wrong])) if wrong.any() else float("nan"),
    }


def _candidate_thresholds(risk: np.ndarray) -> np.ndarray:
    return np.r_[np.unique(np.asarray(risk, np.float64)), np.inf]


def equal_recall_threshold(wrong: np.ndarray, risk: np.ndarray) -> float:
    """The threshold on the validation split where recall(correct) and recall(wrong) are closest.

    Candidates are the distinct risk values (and +inf); among equally close ones the highest
    mean recall wins, then the lowest threshold.
    """
    wrong = np.asarray(wrong, bool)
    if wrong.all() or not wrong.any():
        raise ValueError("equal-recall threshold needs both correct and wrong predictions")
    t = _candidate_thresholds(risk)
    r = np.asarray(risk, np.float64)
    # recall_wrong(t) = P(risk ≥ t | wrong), recall_correct(t) = P(risk < t | correct)
    rw = 1.0 - np.searchsorted(np.sort(r[wrong]), t, side="left") / wrong.sum()
    rc = np.searchsorted(np.sort(r[~wrong]), t, side="left") / (~wrong).sum()
    gap = np.abs(rc - rw)
    best = np.flatnonzero(np.isclose(gap, gap.min()))
    return float(t[best[np.argmax((rc + rw)[best])]])


def threshold_at_recall_correct(wrong: np.ndarray, risk: np.ndarray, target: float = 0.98) -> float:
    """The lowest threshold whose recall of correct predictions (risk < t) is ≥ ``target``."""
    wrong = np.asarray(wrong, bool)
    r = np.sort(np.asarray(risk, np.float64)[~wrong])
    if len(r) == 0:
        raise ValueError("no correct predictions to set a recall target on")
    t = _candidate_thresholds(r)
    rc = np.searchsorted(r, t, side="left") / len(r)
    return float(t[np.argmax(rc >= target)])
