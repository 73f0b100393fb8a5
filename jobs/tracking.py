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

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID


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


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing (a concurrent creator wins the race)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_run(
    client: MlflowClient, exp_id: str, name: str, tags: dict[str, str], params: dict | None = None,
    metrics: dict[str, float] | None = None, artifacts: list[Path] = (), parent_id: str | None = None,
) -> str:
    """One run: tags, params, metrics and artifacts in as few store calls as MLflow's
    batch limits allow (100 params, 1000 metrics a call); a child when ``parent_id`` is given.
    The run is left RUNNING for the caller to terminate. Returns its id."""
    tags = {**tags, **({MLFLOW_PARENT_RUN_ID: parent_id} if parent_id else {})}
    run_id = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    stamp = int(time.time() * 1000)
    for chunk in _chunks([Param(k, str(v)) for k, v in (params or {}).items()], 100):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([Metric(k, float(v), stamp, 0) for k, v in (metrics or {}).items()], 1000):
        client.log_batch(run_id, metrics=chunk)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    return run_id


def child_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """``{dataset}.{metric}`` → value for a child run's rows (columns dataset, metric, value)."""
    return {f"{r.dataset}.{r.metric}": float(r.value) for r in rows.itertuples()}


def log_job(
    uri: str, cfg, tags: dict[str, str], config_path: str, counts: dict, metrics: pd.DataFrame, eval_dir, detectors: dict,
    explain_artifacts: list[Path] = (),
) -> str:
    """The parent run of one job (params, accuracy and count metrics, tables) and one child per
    detector, error method, long-tail variant and explanation. Returns the parent run id; a
    failure while logging marks the parent FAILED."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.experiment)
    run_name = f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    acc = metrics[metrics.task == "classify"]
    parent = log_run(
        client, exp_id, run_name, resolve_tags(tags),
        params={"config": config_path, "model": cfg.model.name, "id_dataset": cfg.data.id_dataset, "ood_datasets": ",".join(cfg.data.ood_datasets)},
        metrics={**{f"acc.{r.dataset.replace('/', '.')}": r.value for r in acc.itertuples()}, **{f"count.{k}": v for k, v in counts.items()}},
        artifacts=[eval_dir.path / "metrics.parquet", eval_dir.path / "results.md"],
    )
    children = []
    try:
        for key, det in detectors.items():
            rows = metrics[(metrics.task == "ood") & (metrics.method == key)]
            children.append((key, {"detector": det.name, **det.params()}, rows, [eval_dir.path / "plots" / f"{key}.png"]))
        for method, rows in metrics[metrics.task == "error"].groupby("method", sort=False):
            children.append((f"error/{method}", {"errors": cfg.errors.model_dump_json()}, rows, []))
        for method, rows in metrics[metrics.task == "ood-lt"].groupby("method", sort=False):
            children.append((f"lt/{method}", {"variant": method, **cfg.graph.model_dump(exclude={"ablations", "enabled"})}, rows, []))
        if explain_artifacts:
            loc = [p for p in explain_artifacts if p.name == "localization.parquet"]
            rows = pd.DataFrame(columns=["dataset", "metric", "value"])
            if loc:
                table = pd.read_parquet(loc[0]).melt(id_vars="method", var_name="metric", value_name="value")
                rows = table.rename(columns={"method": "dataset"}).assign(dataset=lambda d: d.dataset.str.replace("[", "_").str.replace("]", "").str.replace("+", "_"))
            children.append(("explain", cfg.explain.model_dump(), rows, list(explain_artifacts)))
        for name, params, rows, artifacts in children:
            child = log_run(client, exp_id, name, {**tags, "method": name}, params, child_metrics(rows), artifacts, parent_id=parent)
            client.set_terminated(child)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    client.set_terminated(parent)
    return parent


def log_summary(uri: str, run_id: str, summary: dict) -> None:
    """Attach the per-run summary (counts, quarantined rows, stage durations, throughput) to the
    parent run as ``run_summary.json``."""
    MlflowClient(uri).log_dict(run_id, summary, "run_summary.json")
