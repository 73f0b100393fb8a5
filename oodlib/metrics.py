"""Evaluation metrics with the exact conventions of ``specs/metrics.md``.

OOD scores are ID-confidences (higher = more ID); error risks are higher = more likely wrong.
"""
from __future__ import annotations

import numpy as np

# scikit-learn is imported where it is used: a job whose EVALUATE is reused need not load it

OOD_METRICS = ("fpr95", "fpr95_oodpos", "auroc", "aupr_in", "aupr_out")


def check_two_samples(a, b, names: tuple[str, str] = ("ID", "OOD")) -> tuple[np.ndarray, np.ndarray]:
    """Two non-empty, finite 1-D float64 score samples (raveled); ``names`` word the error."""
    s_a = np.asarray(a, np.float64).ravel()
    s_b = np.asarray(b, np.float64).ravel()
    if len(s_a) == 0 or len(s_b) == 0:
        raise ValueError(f"need {names[0]} and {names[1]} scores, got {len(s_a)} {names[0]} and {len(s_b)} {names[1]}")
    if not (np.isfinite(s_a).all() and np.isfinite(s_b).all()):
        raise ValueError("scores contain NaN or Inf")
    return s_a, s_b


def fpr_at_95_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR on OOD at 95% TPR on ID, ID positive (LINE/DICE/KNN convention, the primary ``fpr95``).

    Rule: sort the ID scores ascending; the threshold is t = s_id[round((1 − tpr)·N_id)], so at
    least 95% of ID scores are ≥ t; the FPR is the fraction of OOD scores **strictly greater**
    than t. OOD scores equal to t therefore count as rejected (ties favour the detector only at
    the threshold value itself).
    """
    s_id, s_ood = check_two_samples(id_scores, ood_scores)
    # round(1 − tpr, 12): 1 − 0.95 is 0.05000000000000004 in floating point, which would turn
    # round(0.05 · 10) = 0 into 1
    idx = min(int(round(round(1.0 - tpr, 12) * len(s_id))), len(s_id) - 1)
    threshold = np.sort(s_id)[idx]
    return float(np.mean(s_ood > threshold))


def fpr_at_95_tpr_ood_positive(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR on ID at the first ROC threshold where TPR on OOD ≥ 95% (OpenOOD/PASCL ``fpr95_oodpos``).

    OOD is the positive class with risk = −score; uses ``sklearn.metrics.roc_curve``.
    """
    s_id, s_ood = check_two_samples(id_scores, ood_scores)
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

    s_id, s_ood = check_two_samples(id_scores, ood_scores)
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


# --- failure detection, the FD-Shifts way (confidence κ: higher = trusted; residual r = 1 − correct) ---
#
# Conventions follow IML-DKFZ/fd-shifts@c4467ae (``fd_shifts/analysis/{metrics,rc_stats,
# rc_stats_utils}.py``). Areas are returned as **fractions** (an area under a curve on [0, 1]²);
# FD-Shifts displays AURC/E-AURC/AUGRC ×1000 (``AUC_DISPLAY_SCALE``) — the printed tables do too.

FAILURE_METRICS = ("aurc", "e_aurc", "augrc", "auroc_f", "fpr95_f", "ece")
#: FD-Shifts' TPR level for FPR@95TPR (``tpr >= 0.9495``)
FD_TPR_LEVEL = 0.9495


def _check_failure_inputs(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(confidence, np.float64).ravel()
    c = np.asarray(correct).ravel()
    if len(k) != len(c):
        raise ValueError(f"{len(k)} confidences but {len(c)} correctness labels")
    if len(k) == 0:
        raise ValueError("failure metrics of an empty set")
    if not np.isfinite(k).all():
        raise ValueError("confidences contain NaN or Inf")
    if c.dtype != bool and not np.isin(c, (0, 1)).all():
        raise ValueError("correct must be boolean (or 0/1)")
    return k, c.astype(bool)


def rc_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """The risk–coverage curve (FD-Shifts ``selective_risk_stats``/``generalized_risk_stats``).

    Samples are sorted by confidence ascending and dropped from the low end; a point is emitted
    **only where the confidence changes**, so tied samples leave together. The curve starts at
    coverage 1 with risk = error rate and ends with an extra point at coverage 0.

    Returns ``coverage`` (descending, 1 … 0), ``selective_risk`` (remaining errors / remaining
    samples; the final point repeats the last risk), ``generalized_risk`` (remaining errors / N,
    i.e. the share of all samples that are accepted failures; the final point is 0) and
    ``threshold`` (the smallest accepted confidence of each point but the last).
    """
    k, c = _check_failure_inputs(confidence, correct)
    n = len(k)
    order = np.argsort(k, kind="stable")
    k, r = k[order], (~c[order]).astype(np.float64)
    # remaining errors after dropping the first i+1 sorted samples: suffix sums
    tail = np.cumsum(r[::-1])[::-1]  # tail[j] = Σ r[j:]
    steps = np.flatnonzero(k[:-1] != k[1:])  # i with κ_i ≠ κ_{i+1}: drop samples 0..i
    remaining = n - 1 - steps
    coverage = np.r_[1.0, remaining / n, 0.0]
    errors = tail[steps + 1]
    selective = np.r_[tail[0] / n, errors / remaining]
    selective = np.r_[selective, selective[-1]]
    generalized = np.r_[tail[0] / n, errors / n, 0.0]
    return {"coverage": coverage, "selective_risk": selective, "generalized_risk": generalized,
            "threshold": np.r_[k[0], k[steps + 1]]}


def _area(coverage: np.ndarray, risk: np.ndarray) -> float:
    """−trapz(risk, coverage): coverage is descending (FD-Shifts' linear interpolation)."""
    return float(np.sum((coverage[:-1] - coverage[1:]) * (risk[:-1] + risk[1:]) / 2))


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the (selective) risk–coverage curve of :func:`rc_curve`, trapezoidal (linear
    interpolation between the points, FD-Shifts' default, not its ``legacy`` per-step weights).
    A fraction; FD-Shifts reports ×1000. Lower is better."""
    curve = rc_curve(confidence, correct)
    return _area(curve["coverage"], curve["selective_risk"])


def aurc_optimal(correct: np.ndarray) -> float:
    """AURC* of binary residuals: err + (1 − err)·ln(1 − err), the area under the selective risk
    of a perfect ranking in the continuum limit (FD-Shifts ``aurc_optimal``; at err = 1 it is 1)."""
    err = 1.0 - float(np.mean(np.asarray(correct, bool)))
    return err + ((1.0 - err) * np.log(1.0 - err) if err < 1 else 0.0)


def e_aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Excess AURC = AURC − AURC* (:func:`aurc_optimal`). Non-negative for untied scores up to the
    trapezoid's O(1/N²) discretisation error; confidence plateaus (ties) are interpolated
    linearly and can make it negative (FD-Shifts notes the same)."""
    return aurc(confidence, correct) - aurc_optimal(correct)


def augrc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the generalized risk–coverage curve (generalized risk = accepted failures / N,
    final point (0, 0)), trapezoidal. A fraction; FD-Shifts reports ×1000. For untied scores
    AUGRC = (1 − AUROC_f)·acc·(1 − acc) + ½(1 − acc)²; its optimum is ½·err²."""
    curve = rc_curve(confidence, correct)
    return _area(curve["coverage"], curve["generalized_risk"])


def _roc_points(k: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold (correct = positive, accept κ ≥ t), from (0, 0);
    both classes must be present."""
    order = np.argsort(-k, kind="stable")
    ks, cs = k[order], c[order]
    last = np.r_[np.flatnonzero(ks[:-1] != ks[1:]), len(ks) - 1]  # the end of each tie group
    tp = np.cumsum(cs)[last]
    fp = (last + 1) - tp
    pos = int(cs.sum())
    return np.r_[0.0, fp / (len(cs) - pos)], np.r_[0.0, tp / pos]


def auroc_f(confidence: np.ndarray, correct: np.ndarray) -> float:
    """AUROC of the confidence for separating correct (positive) from failed predictions
    (FD-Shifts ``failauc``; ties count ½, as ``sklearn.metrics.roc_auc_score``). NaN when only one
    class is present (FD-Shifts returns NaN there too)."""
    k, c = _check_failure_inputs(confidence, correct)
    if c.all() or not c.any():
        return float("nan")
    fpr, tpr = _roc_points(k, c)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def fpr95_f(confidence: np.ndarray, correct: np.ndarray, tpr_level: float = FD_TPR_LEVEL) -> float:
    """FPR@95TPR for failure detection (FD-Shifts ``fpr@95tpr``): correct = positive, accepted when
    κ ≥ t; the smallest FPR (the share of failures accepted) over the ROC points whose TPR (share
    of correct predictions accepted) is ≥ 0.9495. Every distinct threshold is a candidate
    (FD-Shifts uses ``roc_curve``'s default ``drop_intermediate=True``, which can skip a collinear
    point and then report a larger value). NaN when only one class is present."""
    k, c = _check_failure_inputs(confidence, correct)
    if c.all() or not c.any():
        return float("nan")
    fpr, tpr = _roc_points(k, c)
    return float(fpr[tpr >= tpr_level].min())


def ece(probability: np.ndarray, correct: np.ndarray, n_bins: int = 20) -> float:
    """Expected calibration error of a probability of being correct (FD-Shifts ``ece``):
    ``n_bins`` equal-width bins on [0, 1 + 1e-8] (values clipped to [0, 1]), ECE =
    Σ_b (n_b/N)·|acc_b − conf_b| over the non-empty bins. Non-probability confidences must be
    mapped to [0, 1] first (Platt/temperature scaling, :mod:`oodlib.errors.failure`)."""
    return float(_calibration(probability, correct, n_bins)[0])


def mce(probability: np.ndarray, correct: np.ndarray, n_bins: int = 20) -> float:
    """Maximum calibration error: max_b |acc_b − conf_b| over the non-empty bins of :func:`ece`."""
    return float(_calibration(probability, correct, n_bins)[1])


def _calibration(probability: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, float]:
    p, c = _check_failure_inputs(probability, correct)
    p = np.clip(p, 0.0, 1.0)
    bins = np.linspace(0.0, 1.0 + 1e-8, n_bins + 1)
    ids = np.digitize(p, bins) - 1
    total = np.bincount(ids, minlength=n_bins)
    conf = np.bincount(ids, weights=p, minlength=n_bins)
    acc = np.bincount(ids, weights=c.astype(np.float64), minlength=n_bins)
    nz = total > 0
    gap = np.abs(acc[nz] - conf[nz]) / total[nz]
    return float(np.sum(gap * total[nz]) / len(p)), float(gap.max())


def failure_metrics(confidence: np.ndarray, correct: np.ndarray, probability: np.ndarray | None = None,
                    n_bins: int = 20) -> dict[str, float]:
    """Every metric of :data:`FAILURE_METRICS` from one sort: ``aurc``, ``e_aurc``, ``augrc``
    (fractions), ``auroc_f``, ``fpr95_f`` on ``confidence`` and ``ece`` on ``probability`` (a
    calibrated probability of being correct; None: the ECE is NaN)."""
    k, c = _check_failure_inputs(confidence, correct)
    curve = rc_curve(k, c)
    out = {"aurc": _area(curve["coverage"], curve["selective_risk"])}
    out["e_aurc"] = out["aurc"] - aurc_optimal(c)
    out["augrc"] = _area(curve["coverage"], curve["generalized_risk"])
    if c.all() or not c.any():
        out["auroc_f"] = out["fpr95_f"] = float("nan")
    else:
        fpr, tpr = _roc_points(k, c)
        out["auroc_f"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        out["fpr95_f"] = float(fpr[tpr >= FD_TPR_LEVEL].min())
    out["ece"] = float("nan") if probability is None else ece(probability, c, n_bins)
    return out
