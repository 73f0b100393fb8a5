"""MLflow tracking, from the driver only: one parent run per job, one child run per detector.

Child runs carry params (hyperparameters) and metrics ``{dataset}.{metric}`` / ``avg.{metric}``;
large tables go in as Parquet artifacts, plots as PNG artifacts. Children are tagged explicitly
with the parent's tags (MLflow does not inherit them).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd


def tracking_uri(configured: str | None, output: Path) -> str:
    """Configured URI, else ``$MLFLOW_TRACKING_URI``, else SQLite in the output directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    output.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{output.resolve() / 'mlflow.db'}"


def redact_uri(uri: str | None) -> str | None:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db``: tracking URIs
    are printed and written to last_run.json, passwords never are."""
    if not uri:
        return uri
    import re

    return re.sub(r"(://[^:/@]+):[^@/]+@", r"\1:***@", uri)


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_parent(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> mlflow.ActiveRun:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, tags=tags)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_child(
    name: str, tags: dict[str, str], params: dict, metrics: pd.DataFrame, artifacts: list[Path]
) -> str:
    """A nested run for one method: params, ``{dataset}.{metric}`` metrics, artifacts. Returns its id."""
    with mlflow.start_run(run_name=name, nested=True, tags={**tags, "method": name}) as child:
        items = list({k: str(v) for k, v in params.items()}.items())
        for chunk in _chunks(items, 100):
            mlflow.log_params(dict(chunk))
        values = {f"{r.dataset}.{r.metric}": float(r.value) for r in metrics.itertuples()}
        for chunk in _chunks(list(values.items()), 1000):
            mlflow.log_metrics(dict(chunk))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return child.info.run_id


def log_job(
    uri: str, cfg, tags: dict[str, str], config_path: str, counts: dict, metrics: pd.DataFrame, eval_dir, detectors: dict,
    explain_artifacts: list[Path] = (),
) -> str:
    """The parent run of one job (params, accuracy and count metrics, tables) and one child per
    detector. Returns the parent run id."""
    run_name = f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    with start_parent(uri, cfg.experiment, run_name, tags) as parent:
        mlflow.log_params(
            {"config": config_path, "model": cfg.model.name, "id_dataset": cfg.data.id_dataset, "ood_datasets": ",".join(cfg.data.ood_datasets)}
        )
        acc = metrics[metrics.task == "classify"]
        mlflow.log_metrics({f"acc.{r.dataset.replace('/', '.')}": float(r.value) for r in acc.itertuples()})
        mlflow.log_metrics({f"count.{k}": float(v) for k, v in counts.items()})
        mlflow.log_artifact(str(eval_dir.path / "metrics.parquet"))
        mlflow.log_artifact(str(eval_dir.path / "results.md"))
        for key, det in detectors.items():
            rows = metrics[(metrics.task == "ood") & (metrics.method == key)]
            log_child(key, tags, {"detector": det.name, **det.params()}, rows, [eval_dir.path / "plots" / f"{key}.png"])
        for method, rows in metrics[metrics.task == "error"].groupby("method", sort=False):
            log_child(f"error/{method}", tags, {"errors": cfg.errors.model_dump_json()}, rows, [])
        lt = metrics[metrics.task == "ood-lt"]
        for method, rows in lt.groupby("method", sort=False):
            log_child(f"lt/{method}", tags, {"variant": method, **cfg.graph.model_dump(exclude={"ablations", "enabled"})}, rows, [])
        if explain_artifacts:
            loc = [p for p in explain_artifacts if p.name == "localization.parquet"]
            rows = pd.DataFrame(columns=["dataset", "metric", "value"])
            if loc:
                table = pd.read_parquet(loc[0]).melt(id_vars="method", var_name="metric", value_name="value")
                rows = table.rename(columns={"method": "dataset"}).assign(dataset=lambda d: d.dataset.str.replace("[", "_").str.replace("]", "").str.replace("+", "_"))
            log_child("explain", tags, cfg.explain.model_dump(), rows, list(explain_artifacts))
        return parent.info.run_id


def log_summary(uri: str, run_id: str, summary: dict) -> None:
    """Attach the per-run summary (counts, quarantined rows, stage durations, throughput) to the
    parent run as ``run_summary.json``."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(summary, "run_summary.json")
