"""Which images to explain: wrong, uncertain and risky-OOD predictions, plus a seeded random sample."""
from __future__ import annotations

import numpy as np


def select_images(
    image_ids,
    pred,
    label,
    confidence,
    ood_score=None,
    counts: dict | None = None,
    seed: int = 0,
):
    """Pick images to explain; returns a DataFrame (``image_id``, ``reason``), no id twice.

    Inputs are aligned arrays: ``label`` −1 marks OOD; ``confidence`` = ID-confidence of the
    prediction (e.g. MSP, higher = surer); ``ood_score`` = ID-confidence of an OOD detector
    (higher = more ID; default ``confidence``). Reasons, in order, with ``counts`` (defaults 8 each):
    ``wrong`` (ID, pred ≠ label, most confident first), ``uncertain`` (ID, lowest confidence),
    ``risky_ood`` (OOD the detector finds most ID-like = highest ``ood_score``), ``random`` (seeded).
    """
    import pandas as pd

    ids, pred, label = np.asarray(image_ids), np.asarray(pred), np.asarray(label)
    conf = np.asarray(confidence, float)
    ood = conf if ood_score is None else np.asarray(ood_score, float)
    counts = {"wrong": 8, "uncertain": 8, "risky_ood": 8, "random": 8, **(counts or {})}
    is_id = label >= 0
    pools = {
        "wrong": np.flatnonzero(is_id & (pred != label))[np.argsort(-conf[is_id & (pred != label)], kind="stable")],
        "uncertain": np.flatnonzero(is_id)[np.argsort(conf[is_id], kind="stable")],
        "risky_ood": np.flatnonzero(~is_id)[np.argsort(-ood[~is_id], kind="stable")],
        "random": np.random.default_rng(seed).permutation(len(ids)),
    }
    taken: set[int] = set()
    rows = []
    for reason in ("wrong", "uncertain", "risky_ood", "random"):
        picked = [i for i in pools[reason] if i not in taken][: counts.get(reason, 0)]
        taken.update(picked)
        rows += [(ids[i], reason) for i in picked]
    return pd.DataFrame(rows, columns=["image_id", "reason"])
