"""Metric tables over a scores table (one row per image, one ``score_<name>`` column per
detector): long rows ``task, method, dataset, metric, value`` as the ``metrics`` table stores them.

OOD metrics compare the ID test split with each OOD set (``avg`` = unweighted mean over the
sets); ``classify`` rows hold the accuracy per labelled dataset and split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from oodlib.metrics import OOD_METRICS, accuracy, ood_metrics


def score_columns(scores: pd.DataFrame) -> list[str]:
    return [c for c in scores.columns if c.startswith("score_")]


def ood_metric_rows(scores: pd.DataFrame, id_dataset: str, ood_datasets: list[str]) -> list[dict]:
    """Metrics of every ``score_*`` column for ID test vs each OOD set, plus ``avg`` rows."""
    id_rows = scores[(scores.dataset == id_dataset) & (scores.split == "test")]
    if id_rows.empty:
        raise ValueError(f"no scored rows for the ID test split of {id_dataset!r}")
    rows = []
    for column in score_columns(scores):
        method = column.removeprefix("score_")
        per_set = {}
        for ood in ood_datasets:
            ood_rows = scores[scores.dataset == ood]
            if ood_rows.empty:
                raise ValueError(f"no scored rows for OOD dataset {ood!r}")
            per_set[ood] = ood_metrics(id_rows[column].to_numpy(), ood_rows[column].to_numpy())
            rows += [dict(task="ood", method=method, dataset=ood, metric=k, value=v) for k, v in per_set[ood].items()]
        rows += [
            dict(task="ood", method=method, dataset="avg", metric=k, value=float(np.mean([m[k] for m in per_set.values()])))
            for k in OOD_METRICS
        ]
    return rows


def classify_rows(scores: pd.DataFrame, id_dataset: str) -> list[dict]:
    """ID accuracy per split of the ID dataset (and of any other labelled dataset)."""
    rows = []
    labelled = scores[scores.label >= 0]
    for (dataset, split), group in labelled.groupby(["dataset", "split"], sort=True):
        name = dataset if split == "test" else f"{dataset}/{split}"
        rows.append(dict(task="classify", method="model", dataset=name, metric="acc", value=accuracy(group.label, group.pred)))
    return rows
