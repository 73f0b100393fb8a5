"""Markdown tables of the metrics a run prints and logs (percent where the printed table says so;
the ``metrics`` table and MLflow hold fractions)."""
from __future__ import annotations

import pandas as pd

from oodlib.metrics import FAILURE_METRICS, OOD_METRICS

#: printed names and scale of the failure metrics (areas ×1000 as FD-Shifts prints them, rates in percent)
FAILURE_COLUMNS = {"aurc": ("AURC", 1000), "e_aurc": ("E-AURC", 1000), "augrc": ("AUGRC", 1000),
                   "auroc_f": ("AUROC_f", 100), "fpr95_f": ("FPR@95_f", 100), "ece": ("ECE", 100)}


def results_markdown(metrics: pd.DataFrame) -> str:
    """Per task: OOD set × method table (percent) — ``ood`` (feature/logit detectors; OOD sets, then
    the ``data.ood_groups`` groups, then ``avg``) and ``ood-lt`` (long-tailed graph variants, with
    ID accuracy) — the wrong-prediction table, the failure-detection tables per failure source
    (:func:`failure_markdown`), then ID accuracy lines."""
    lines: list[str] = []
    for task, title in (("ood", "OOD detection (percent)"), ("ood-lt", "Long-tailed OOD, graph stage (percent)")):
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
        lines += ["### Wrong-prediction detection (percent; wrong = positive; recalls at the equal-recall threshold fitted on val)", "",
                  "| method | " + " | ".join(f"{d} {m}" for d, m in cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {method} | " + " | ".join(f"{100 * row[c]:.2f}" for c in cols) + " |" for method, row in wide.iterrows()] + [""]
    if (metrics.task == "failure").any():
        lines += [failure_markdown(metrics), ""]
    acc = metrics[metrics.task == "classify"]
    lines += ["| ID set | accuracy (percent) |", "|---|---:|"] + [f"| {r.dataset} | {100 * r.value:.2f} |" for r in acc.itertuples()]
    return "\n".join(lines)


def failure_markdown(metrics: pd.DataFrame) -> str:
    """The FD-Shifts failure-detection tables of the ``failure`` rows: one table per failure source
    (its N and accuracy in the heading), one row per method, each metric with its bootstrap 95%
    interval in brackets when there is one."""
    rows = metrics[metrics.task == "failure"]
    value = {(r.dataset, r.method, r.metric): r.value for r in rows.itertuples()}

    def cell(source: str, method: str, metric: str) -> str:
        scale = FAILURE_COLUMNS[metric][1]
        v = value.get((source, method, metric), float("nan"))
        text = "–" if pd.isna(v) else f"{scale * v:.2f}"
        lo, hi = value.get((source, method, f"{metric}_lo")), value.get((source, method, f"{metric}_hi"))
        if lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
            text += f" [{scale * lo:.2f}, {scale * hi:.2f}]"
        return text

    lines = ["### Failure detection (FD-Shifts): AURC, E-AURC, AUGRC ×1000 (lower is better), AUROC_f, FPR@95_f "
             "and ECE in percent; [bootstrap 95% interval]; confidence = the score, or 1 − risk for the error detectors", ""]
    for source in rows.dataset.drop_duplicates():
        n, acc = value.get((source, "model", "n")), value.get((source, "model", "acc"))
        head = f"#### {source}" + (f" — N = {int(n)}, accuracy {100 * acc:.2f}%" if n is not None and acc is not None else "")
        lines += [head, "", "| method | " + " | ".join(FAILURE_COLUMNS[m][0] for m in FAILURE_METRICS) + " |",
                  "|---|" + "---:|" * len(FAILURE_METRICS)]
        methods = rows[(rows.dataset == source) & (rows.method != "model")].method.drop_duplicates()
        lines += [f"| {m} | " + " | ".join(cell(source, m, k) for k in FAILURE_METRICS) + " |" for m in methods] + [""]
    return "\n".join(lines).rstrip()


def error_markdown(table: pd.DataFrame, lcr_t3: pd.DataFrame, used_mean: float, n_mutants: int | None) -> str:
    """The wrong-prediction table (seed Tables 4–6), the LCR of correct vs wrong (Table 3) and the
    SPRT's mean mutant count (of ``n_mutants`` when every mutant ran)."""
    cols = ["val_auroc", "val_recall_correct", "val_recall_wrong", "test_auroc", "test_recall_correct", "test_recall_wrong"]
    lines = ["Wrong-prediction detection (percent; wrong = positive)", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['method']} | " + " | ".join(f"{100 * r[c]:.2f}" for c in cols) + " |" for _, r in table.iterrows()]
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
