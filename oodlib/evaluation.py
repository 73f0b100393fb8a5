"""Metric tables over a scores table (one row per image, one ``score_<name>`` column per
detector): long rows ``task, method, dataset, metric, value`` as the ``metrics`` table stores them.

OOD metrics compare the ID test split with each OOD set (``avg`` = unweighted mean over the
sets; a named group such as OpenOOD's ``near``/``far`` = unweighted mean over its sets);
``classify`` rows hold the accuracy per labelled dataset and split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from oodlib.metrics import OOD_METRICS, accuracy, ood_metrics


def score_columns(scores: pd.DataFrame) -> list[str]:
    return [c for c in scores.columns if c.startswith("score_")]


def ood_metric_rows(
    scores: pd.DataFrame, id_dataset: str, ood_datasets: list[str], groups: dict[str, list[str]] | None = None
) -> list[dict]:
    """Metrics of every ``score_*`` column for ID test vs each OOD set, then one row per metric for
    each of ``groups`` ({name: OOD sets}, dataset = the name: the unweighted mean over its sets,
    as OpenOOD v1.5 reports near/far) and the ``avg`` rows (mean over every set)."""
    for name, members in (groups or {}).items():
        if name == "avg" or name in ood_datasets or not members or set(members) - set(ood_datasets):
            raise ValueError(f"OOD group {name!r}: must be a new name listing OOD sets of {ood_datasets}, got {members}")
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
        for name, members in (groups or {}).items():
            rows += [dict(task="ood", method=method, dataset=name, metric=k, value=float(np.mean([per_set[s][k] for s in members])))
                     for k in OOD_METRICS]
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
