"""Per-image verdicts: which images are flagged, and a sentence saying why.

An image is flagged **OOD** when its primary OOD score < the OOD threshold (scores are
ID-confidences) and **likely wrong** when its primary risk ≥ the risk threshold
(:mod:`oodlib.verdicts.thresholds`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from oodlib.verdicts.thresholds import OODThreshold, RiskThreshold

VERDICTS = ("ok", "ood", "likely-wrong", "ood+likely-wrong")


def image_verdicts(image_ids, scores, ood: OODThreshold, risks=None, risk: RiskThreshold | None = None,
                   ood_name: str = "score", risk_name: str = "risk") -> pd.DataFrame:
    """One row per image: ``image_id``, ``score``, ``risk`` (NaN without risks), ``is_ood``,
    ``likely_wrong``, ``flagged`` (either), ``verdict`` (one of :data:`VERDICTS`), ``reasons``
    (a list of codes: ``ood:<ood_name>``, ``risk:<risk_name>``; empty when not flagged) and ``why``
    (``"; "``-joined sentences with the numbers, empty when not flagged). ``scores``/``risks``: (N,) arrays;
    ``ood_name``/``risk_name``: the detectors' names used in the reasons."""
    ids = list(image_ids)
    s = np.asarray(scores, np.float64).ravel()
    if len(s) != len(ids):
        raise ValueError(f"{len(ids)} image ids but {len(s)} scores")
    r = np.full(len(s), np.nan) if risks is None else np.asarray(risks, np.float64).ravel()
    if len(r) != len(s):
        raise ValueError(f"{len(s)} scores but {len(r)} risks")
    ood_flag = ood.flag(s)
    risk_flag = np.zeros(len(s), bool) if risk is None or risks is None else risk.flag(r)
    keep = f"{100 * ood.target_tpr:g}% of ID-val images score ≥ it"
    reasons, why = [], []
    for si, ri, fo, fr in zip(s, r, ood_flag, risk_flag):
        parts = []
        if fo:
            parts.append(f"OOD: {ood_name} {si:.4g} < threshold {ood.threshold:.4g} ({keep})")
        if fr:
            parts.append(f"likely wrong: {risk_name} {ri:.4g} ≥ threshold {risk.threshold:.4g} ({rule_phrase(risk)})")
        why.append("; ".join(parts))
        reasons.append([code for code, f in ((f"ood:{ood_name}", fo), (f"risk:{risk_name}", fr)) if f])
    verdict = np.asarray(VERDICTS)[ood_flag.astype(int) + 2 * risk_flag.astype(int)]
    return pd.DataFrame({"image_id": ids, "score": s, "risk": r, "is_ood": ood_flag, "likely_wrong": risk_flag,
                         "flagged": ood_flag | risk_flag, "verdict": verdict, "reasons": reasons, "why": why})


def rule_phrase(risk: RiskThreshold) -> str:
    """How the risk threshold was set, in words."""
    if risk.rule == "recall_correct":
        return f"{100 * risk.target_recall:g}% of correct val predictions stay below it"
    if risk.rule == "recall_wrong":
        return f"it catches {100 * risk.target_recall:g}% of wrong val predictions"
    return "equal recall of correct and wrong val predictions"


def top_flagged(verdicts: pd.DataFrame, k: int = 8) -> pd.DataFrame:
    """The ``k`` flagged rows to show first: OOD-flagged before risk-only flagged; among the OOD
    ones the lowest score first, then the highest risk; among the risk-only ones the highest risk
    first (ties by image id)."""
    f = verdicts[verdicts.flagged].copy()
    f["_risk"] = f.risk.fillna(-np.inf)
    f["_score"] = np.where(f.is_ood, f.score, np.inf)
    f = f.sort_values(["is_ood", "_score", "_risk", "image_id"], ascending=[False, True, False, True])
    return f.drop(columns=["_risk", "_score"]).head(k).reset_index(drop=True)
