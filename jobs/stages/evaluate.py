"""EVALUATE: the ``metrics`` table (task, method, dataset, metric, value; fractions; per OOD set,
per ``data.ood_groups`` group and ``avg``), the printed results table (``results.md``, percent)
and one ROC/histogram PNG per detector."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import JobConfig
from jobs.stages.base import Child, Context, Stage, StageResult, per_set_metrics
from oodlib.evaluation import classify_rows, ood_metric_rows
from oodlib.reporting.ood import plot_roc_and_histograms
from oodlib.reporting.tables import results_markdown

METRICS_SCHEMA = pa.schema(
    [("task", pa.string()), ("method", pa.string()), ("dataset", pa.string()), ("metric", pa.string()), ("value", pa.float64())]
)


@dataclass
class EvaluateResult(StageResult):
    table: pd.DataFrame

    def metrics(self) -> pd.DataFrame:
        return self.table

    def children(self, ctx: Context) -> list[Child]:
        """One child run per detector: its hyperparameters, per-set metrics and its plot."""
        out, detectors = [], ctx.build_detectors()
        for d in ctx.detectors:
            rows = self.table[(self.table.task == "ood") & (self.table.method == d.key)]
            params = {"detector": d.name, **detectors[d.key].params()}
            out.append(Child(run_name(d.key, d.name, detectors[d.key].params()), params, per_set_metrics(rows),
                             [self.path / "plots" / f"{d.key}.png"], method=d.key))
        return out


def run_name(column: str, detector: str, params: dict) -> str:
    """A child run's name that says what it is: ``knn(k=50)``, ``line_no_wp = line(p_w=None, …)``."""
    args = ", ".join(f"{k}={v}" for k, v in params.items())
    call = f"{detector}({args})"
    return call if column == detector else f"{column} = {call}"


class EvaluateStage(Stage):
    name = "evaluate"
    version = 2

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("score",)

    def key(self, ctx: Context, up: dict) -> dict:
        key = {"scores": up["score"].path.name, "id": ctx.cfg.data.id_dataset, "ood": ctx.cfg.data.ood_datasets}
        if ctx.cfg.data.ood_groups:  # only when set: a config without groups keeps its committed result
            key["groups"] = ctx.cfg.data.ood_groups
        return key

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        data = ctx.cfg.data
        scores = up["score"].read()
        rows = ood_metric_rows(scores, data.id_dataset, data.ood_datasets, data.ood_groups) + classify_rows(scores, data.id_dataset)
        metrics = pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)
        storage.write_table(metrics, tmp, "metrics.parquet")
        plot_roc_and_histograms(scores, data.id_dataset, data.ood_datasets, tmp / "plots")
        (tmp / "results.md").write_text(results_markdown(metrics.to_pandas()))

    def load(self, ctx: Context, up: dict, path: Path) -> EvaluateResult:
        return EvaluateResult(path, pq.read_table(path / "metrics.parquet").to_pandas())
