"""Verdicts: what a nightly run concludes about each incoming image and batch (issue #15).

* :mod:`~oodlib.verdicts.thresholds` — OOD and risk thresholds fitted on val, with bootstrap
  intervals; the choice of the primary detector and risk;
* :mod:`~oodlib.verdicts.flags` — per-image flags and reasons; the top flagged images;
* :mod:`~oodlib.verdicts.rates` — flag rates per batch with Wilson intervals;
* :mod:`~oodlib.verdicts.drift` — two-sample drift tests (classifier test on features, KS on the score);
* :mod:`~oodlib.verdicts.alerts` — the alert decision over the batch history.

Conventions: OOD scores are ID-confidences (flag OOD when score < t); risks are higher = more
likely wrong (flag when risk ≥ t, as :func:`oodlib.metrics.recalls_at`); rates are fractions.
"""
from oodlib.verdicts.alerts import (
    AlertDecision,
    alert_history,
    decide_alert,
    decisions_frame,
)
from oodlib.verdicts.drift import DriftTest, classifier_drift_test, ks_drift_test
from oodlib.verdicts.flags import VERDICTS, image_verdicts, top_flagged
from oodlib.verdicts.rates import flag_rate_table, wilson_interval
from oodlib.verdicts.thresholds import (
    OODThreshold,
    PrimaryChoice,
    RiskThreshold,
    choose_primary,
    ood_threshold,
    risk_threshold,
    threshold_at_recall_wrong,
)

__all__ = [
    "VERDICTS",
    "AlertDecision",
    "DriftTest",
    "OODThreshold",
    "PrimaryChoice",
    "RiskThreshold",
    "alert_history",
    "choose_primary",
    "classifier_drift_test",
    "decide_alert",
    "decisions_frame",
    "flag_rate_table",
    "image_verdicts",
    "ks_drift_test",
    "ood_threshold",
    "risk_threshold",
    "threshold_at_recall_wrong",
    "top_flagged",
    "wilson_interval",
]
