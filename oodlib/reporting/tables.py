"""Markdown tables of the metrics a run prints and logs (percent where the printed table says so;
the ``metrics`` table and MLflow hold fractions)."""
from __future__ import annotations

import pandas as pd

from oodlib.metrics import OOD_METRICS


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


def error_markdown(table: pd.DataFrame, lcr_t3: pd.DataFrame, used_mean: float, n_mutants: int | None) -> str:
    """The wrong-prediction table (seed Tables 4–6), the LCR of correct vs wrong (Table 3) and the
    SPRT's mean mutant count (of ``n_mutants`` when every mutant ran)."""
    cols = ["val_auroc", "val_recall_correct", "val_recall_wrong", "test_auroc", "test_recall_correct", "test_recall_wrong"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['method']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for _, r in table.iterrows()]
    r = lcr_t3.iloc[0]
    lines += ["", f"LCR ({r.operator} {r.rate}): correct {r.correct_mean:.3f} ± {r.correct_std:.3f}, "
              f"wrong {r.wrong_mean:.3f} ± {r.wrong_std:.3f}",
              f"SPRT: {used_mean:.1f} mutants per input on average" + (f" of {n_mutants}" if n_mutants is not None else "")]
    return "\n".join(lines)


def localization_markdown(table: pd.DataFrame) -> str:
    """One row per attribution method, one column per localization metric."""
    cols = [c for c in table.columns if c not in ("method",)]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in table.itertuples(index=False):
        d = r._asdict()
        lines.append(f"| {d['method']} | " + " | ".join(f"{d[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def sweep_markdown(table: pd.DataFrame, params: list[str]) -> str:
    """A hyperparameter sweep: one row per setting (percent); for a 2-D grid also the
    ``params[0]`` × ``params[1]`` matrices of the averages (like the LINE paper's Tables 3–5)."""
    lines = []
    if len(params) == 2:
        for metric in ("avg.fpr95", "avg.auroc"):
            mat = table.pivot(index=params[0], columns=params[1], values=metric)
            lines += [f"**{metric}** ({params[0]} rows × {params[1]} columns)", "", "| " + " | ".join([params[0], *map(str, mat.columns)]) + " |",
                      "|---|" + "---:|" * len(mat.columns)]
            lines += ["| " + " | ".join([str(i), *(f"{v:.2f}" for v in row)]) + " |" for i, row in mat.iterrows()] + [""]
    cols = [c for c in table.columns if c != "column"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(params) + "---:|" * (len(cols) - len(params))]
    for r in table[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)
