"""EVALUATE: the ``metrics`` table (task, method, dataset, metric, value) and the plots.

OOD metrics compare the ID test split with each OOD set (``avg`` = unweighted mean over the
sets); ``classify`` rows hold ID accuracy per split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from oodlib.metrics import OOD_METRICS, accuracy, ood_metrics

METRICS_SCHEMA = pa.schema(
    [("task", pa.string()), ("method", pa.string()), ("dataset", pa.string()), ("metric", pa.string()), ("value", pa.float64())]
)


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


def metrics_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def results_markdown(metrics: pd.DataFrame) -> str:
    """Per task: OOD set × method table (percent) — ``ood`` (feature/logit detectors) and
    ``ood-lt`` (long-tailed graph variants, with ID accuracy) — then ID accuracy lines."""
    lines: list[str] = []
    for task, title in (("ood", "OOD detection"), ("ood-lt", "Long-tailed OOD (graph stage)")):
        rows = metrics[metrics.task == task]
        if rows.empty:
            continue
        cols = [m for m in (*OOD_METRICS, "acc", "acc_head", "acc_tail") if m in set(rows.metric)]
        wide = rows.pivot_table(index=["dataset", "method"], columns="metric", values="value", sort=False)[cols]
        lines += [f"### {title}", "", "| OOD set | method | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        for (dataset, method), row in wide.iterrows():
            lines.append(f"| {dataset} | {method} | " + " | ".join("" if pd.isna(row[m]) else f"{100 * row[m]:.2f}" for m in cols) + " |")
        lines.append("")
    err = metrics[(metrics.task == "error") & metrics.metric.isin(["auroc", "recall_correct", "recall_wrong"])]
    if not err.empty:
        wide = err.pivot_table(index="method", columns=["dataset", "metric"], values="value", sort=False)
        cols = [c for c in [(d, m) for d in ("val", "test") for m in ("auroc", "recall_correct", "recall_wrong")] if c in wide.columns]
        lines += ["### Wrong-prediction detection (wrong = positive; recalls at the equal-recall threshold fitted on val)", "",
                  "| method | " + " | ".join(f"{d} {m}" for d, m in cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {method} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |" for method, row in wide.iterrows()] + [""]
    acc = metrics[metrics.task == "classify"]
    lines += ["| ID set | accuracy |", "|---|---:|"] + [f"| {r.dataset} | {100 * r.value:.2f} |" for r in acc.itertuples()]
    return "\n".join(lines)


def plot_roc_and_histograms(scores: pd.DataFrame, id_dataset: str, ood_datasets: list[str], out_dir: Path) -> list[Path]:
    """Per detector: ROC curves (ID positive, one curve per OOD set) and score histograms, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    id_rows = scores[(scores.dataset == id_dataset) & (scores.split == "test")]
    paths = []
    for column in score_columns(scores):
        method = column.removeprefix("score_")
        fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(11, 4.2))
        s_id = id_rows[column].to_numpy()
        bins = np.histogram_bin_edges(scores[column].to_numpy(), bins=50)
        ax_hist.hist(s_id, bins=bins, alpha=0.55, density=True, label=f"{id_dataset} (ID)")
        for ood in ood_datasets:
            s_ood = scores.loc[scores.dataset == ood, column].to_numpy()
            fpr, tpr, _ = roc_curve(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
            ax_roc.plot(fpr, tpr, label=ood)
            ax_hist.hist(s_ood, bins=bins, alpha=0.45, density=True, histtype="stepfilled", label=ood)
        ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax_roc.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=f"ROC — {method}")
        ax_hist.set(xlabel=f"{method} score (higher = more ID)", ylabel="density", title="score histograms")
        ax_roc.legend(fontsize=8)
        ax_hist.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{method}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
