"""Hyperparameter sweeps over stored features (no re-embedding).

    oodlib sweep --config configs/digits.yaml --grid line.delta=0.1,0.4,0.8,1.0,1.5,2.0,inf
    oodlib sweep --config configs/digits.yaml --grid line.p_a=10,50,90 --grid line.p_w=10,50,90

Each ``--grid DETECTOR.PARAM=v1,v2,…`` adds an axis; the grid is their cartesian product. The
sweep is the ordinary job with the grid's settings as its detectors, up to EVALUATE, so EMBED is
reused from the content-keyed store and only FIT/SCORE/EVALUATE run; each setting is an MLflow child run. The
table (one row per setting, per-set and average FPR95/AUROC; a p_a × p_w matrix for 2-D grids,
like the LINE paper's Tables 3–5) is written as Markdown and Parquet and logged to the parent run.
``inf``, ``off`` and ``none`` switch a step off (e.g. δ = ∞: no activation clipping).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pyarrow as pa
import yaml

from jobs import pipeline, storage, store
from jobs.config import ConfigError, DetectorConfig, JobConfig
from oodlib.reporting.tables import sweep_markdown

OFF = {"inf", "off", "none", "null"}


def parse_axis(text: str) -> tuple[str, str, list]:
    """``line.delta=0.1,inf`` → ("line", "delta", [0.1, None])."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--grid {text!r}: expected DETECTOR.PARAM=v1,v2,…")
    key, values = text.split("=", 1)
    detector, param = key.split(".", 1)
    parsed = [None if v.strip().lower() in OFF else yaml.safe_load(v) for v in values.split(",")]
    return detector, param, parsed


def value_token(value) -> str:
    """A parameter value as a column-name token: ``0.8`` → ``0p8``, None → ``off``, ``-1`` → ``m1``."""
    text = "off" if value is None else str(value).lower()
    return "".join(c if c.isalnum() else {".": "p", "-": "m"}.get(c, "_") for c in text)


def grid_detectors(cfg: JobConfig, axes: list[tuple[str, str, list]]) -> tuple[list[DetectorConfig], pd.DataFrame]:
    """One detector entry per grid point (base params from the config's first entry of that
    detector), and a table of the settings (``column`` + one column per swept parameter)."""
    names = {a[0] for a in axes}
    if len(names) != 1:
        raise ConfigError(f"--grid: sweep one detector at a time, got {sorted(names)}")
    name = names.pop()
    base = next((d.params for d in cfg.detectors if d.name == name), {})
    entries, rows = [], []
    for point in itertools.product(*[a[2] for a in axes]):
        params = {**base, **{a[1]: v for a, v in zip(axes, point)}}
        column = "_".join([name, *(f"{a[1]}_{value_token(v)}" for a, v in zip(axes, point))])
        entries.append(DetectorConfig(name=name, params=params, column=column))
        rows.append({"column": column, **{a[1]: ("off" if v is None else str(v)) for a, v in zip(axes, point)}})
    return entries, pd.DataFrame(rows)


def sweep_table(metrics: pd.DataFrame, settings: pd.DataFrame) -> pd.DataFrame:
    """Settings × (per-set and avg fpr95/auroc), in percent."""
    ood = metrics[(metrics.task == "ood") & metrics.metric.isin(["fpr95", "auroc"])]
    wide = ood.pivot_table(index="method", columns=["dataset", "metric"], values="value") * 100
    wide.columns = [f"{d}.{m}" for d, m in wide.columns]
    return settings.merge(wide, left_on="column", right_index=True)


def run_sweep(cfg: JobConfig, axes: list[tuple[str, str, list]], config_path: str = "") -> tuple[pd.DataFrame, Path]:
    """Run the grid as one job (EMBED reused) and commit the sweep table. Returns (table, dir)."""
    entries, settings = grid_detectors(cfg, axes)
    summary = pipeline.run(cfg, schedule="sweep", config_path=config_path, detectors=entries, targets=("evaluate",))
    metrics = pd.read_parquet(storage.fetch(store.local_path(summary["stages"]["evaluate"])) / "metrics.parquet")
    table = sweep_table(metrics, settings)
    params = [a[1] for a in axes]
    key = storage.content_key("sweep", 1, metrics=summary["stages"]["evaluate"], axes=[(a[0], a[1], a[2]) for a in axes])
    target = storage.stage_dir(cfg.output, cfg.experiment, "sweeps", key)
    if not target.committed():
        with target.writing() as tmp:
            storage.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp, "sweep.parquet")
            (tmp / "sweep.md").write_text(sweep_markdown(table, params))
    storage.fetch(target.path)
    if summary["mlflow_run_id"]:
        import mlflow

        mlflow.set_tracking_uri(summary["tracking_uri"])
        with mlflow.start_run(run_id=summary["mlflow_run_id"]):
            mlflow.set_tag("sweep", ",".join(f"{a[0]}.{a[1]}" for a in axes))
            mlflow.log_artifact(str(target.path / "sweep.md"))
            mlflow.log_artifact(str(target.path / "sweep.parquet"))
    print("\n" + (target.path / "sweep.md").read_text())
    print(f"\nsweep table: {store.uri(target.path)}")
    return table, target.path
