"""The main job: MANIFEST → EMBED → FIT → SCORE → EVALUATE, logged to MLflow.

    python -m jobs.nightly --config configs/digits.yaml [--set embed.batch_size=128] [--schedule nightly]

This is what ``ray job submit`` runs. The config is validated before Ray starts (exit code 2 on
a bad config, naming the field). Stages whose content key is already committed are reused.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from jobs import embed, evaluate, fit, score, storage
from jobs.config import ConfigError, JobConfig, load_config
from oodlib.data.digits import build_digits
from oodlib.data.manifest import ManifestError, manifest_from_image_sets, read_manifest
from oodlib.detectors import Detector, Head, make_detector
from oodlib.models import ModelAdapter, WeightsError, load_model

log = logging.getLogger("oodlib.nightly")
MANIFEST_VERSION = 1


@dataclass
class StageLog:
    """What each stage did (reused or computed), for the summary and last_run.json."""

    paths: dict[str, str] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)

    def record(self, stage: str, target: storage.StageDir, reused: bool, seconds: float) -> None:
        self.paths[stage] = str(target.path)
        self.reused[stage] = reused
        self.seconds[stage] = round(seconds, 2)
        print(f"[{stage}] {'reused committed result' if reused else 'computed'} in {seconds:.1f}s → {target.path}", flush=True)


# --- inputs ---


def prepare_manifest(cfg: JobConfig) -> tuple[pa.Table, str, Path]:
    """The full manifest, its content hash and where it lives (digits: generated and committed)."""
    if cfg.data.source == "manifest":
        path = Path(cfg.data.manifest)
        return read_manifest(path), storage.file_hash(path), path
    key = storage.content_key("manifest", MANIFEST_VERSION, source="digits", seed=cfg.data.seed)
    target = storage.stage_dir(cfg.output, cfg.experiment, "manifest", key)
    if not target.done:
        with target.writing() as tmp:
            storage.write_table(manifest_from_image_sets(build_digits(cfg.data.seed)), tmp, "manifest.parquet")
    path = target.path / "manifest.parquet"
    return read_manifest(path), key, path


def select_rows(manifest: pa.Table, cfg: JobConfig) -> pa.Table:
    """Rows of the configured datasets (every split), at most ``limit_per_split`` per (dataset, split).

    Raises :class:`ConfigError` naming the config field when a dataset is not in the manifest.
    """
    present = set(manifest.column("dataset").to_pylist())
    wanted = {"data.id_dataset": [cfg.data.id_dataset], "data.ood_datasets": cfg.data.ood_datasets, "data.extra_datasets": cfg.data.extra_datasets}
    for fname, names in wanted.items():
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(f"{fname}: dataset(s) {missing} not in the manifest (has {sorted(present)})")
    datasets = [n for names in wanted.values() for n in names]
    table = manifest.filter(pc.is_in(manifest.column("dataset"), pa.array(datasets)))
    if cfg.data.limit_per_split:
        keys = np.char.add(np.asarray(table.column("dataset").to_pylist(), str), np.asarray(table.column("split").to_pylist(), str))
        keep = np.zeros(len(keys), bool)
        for k in np.unique(keys):
            keep[np.flatnonzero(keys == k)[: cfg.data.limit_per_split]] = True
        table = table.filter(pa.array(keep))
    id_test = table.filter(pc.and_(pc.equal(table.column("dataset"), cfg.data.id_dataset), pc.equal(table.column("split"), "test")))
    id_train = table.filter(pc.and_(pc.equal(table.column("dataset"), cfg.data.id_dataset), pc.equal(table.column("split"), "train")))
    if id_test.num_rows == 0 or id_train.num_rows == 0:
        raise ConfigError(f"data.id_dataset: {cfg.data.id_dataset!r} needs train and test rows in the manifest")
    return table


def build_detectors(cfg: JobConfig) -> dict[str, Detector]:
    """Configured detectors keyed by column name (``score_<key>``)."""
    out = {}
    for d in cfg.detectors:
        try:
            out[d.key] = make_detector(d.name, **d.params)
        except TypeError as exc:
            raise ConfigError(f"detectors[{d.key}].params: {exc}") from None
    return out


def load_job_model(cfg: JobConfig) -> ModelAdapter:
    """The configured model on the driver (for hashing, the head, and shipping to actors)."""
    num_classes = cfg.model.num_classes or 1000
    return load_model(cfg.model.name, cfg.model.weights, num_classes)


# --- Ray ---


def init_ray() -> None:
    """Connect to ``$RAY_ADDRESS`` (or the cluster this job was submitted to), else start local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None)


# --- the job ---


def run(cfg: JobConfig, schedule: str | None = None, config_path: str = "") -> dict:
    """Run every stage for ``cfg``; returns the summary written to ``last_run.json``."""
    import ray

    from jobs import tracking

    started = time.time()
    stages = StageLog()
    exp_root = Path(cfg.output) / cfg.experiment
    manifest, manifest_hash, manifest_path = prepare_manifest(cfg)
    selected = select_rows(manifest, cfg)
    detectors = build_detectors(cfg)
    model = load_job_model(cfg)
    model_hash = model.weights_hash()
    W, b = model.head_arrays()
    head = Head(W, b)
    selection = {"datasets": sorted(set(selected.column("dataset").to_pylist())), "limit": cfg.data.limit_per_split}
    print(f"[manifest] {manifest.num_rows} images in {manifest_path}; selected {selected.num_rows} for this job", flush=True)

    init_ray()

    # EMBED
    t0 = time.time()
    embed_key = storage.content_key(
        "embed", embed.STAGE_VERSION, model=model_hash, manifest=manifest_hash, selection=selection, preprocess=repr(model.preprocess)
    )
    embed_dir = storage.stage_dir(cfg.output, cfg.experiment, "embed", embed_key)
    reused = embed_dir.done
    if not reused:
        spec = embed.ModelSpec(cfg.model.name, model.num_classes, ray.put(embed.model_state_arrays(model)), cfg.model.device)
        embed.run_embed(
            selected, spec, embed_dir, cfg.embed.batch_size, cfg.embed.num_actors,
            embed.gpus_per_actor(cfg.embed.num_gpus_per_actor), cfg.embed.cpus_per_actor,
        )
    stages.counts["embed"] = json.loads((embed_dir.path / "counts.json").read_text())
    stages.record("embed", embed_dir, reused, time.time() - t0)
    features_dir = embed_dir.path / "features"

    # FIT
    t0 = time.time()
    det_cfg = [d.model_dump() for d in cfg.detectors]
    fit_key = storage.content_key("fit", fit.STAGE_VERSION, embed=embed_key, detectors=det_cfg, id_dataset=cfg.data.id_dataset)
    fit_dir = storage.stage_dir(cfg.output, cfg.experiment, "fitted", fit_key)
    reused = fit_dir.done
    if not reused:
        second = any(getattr(d, "needs_second_moments", False) for d in detectors.values())
        moments = fit.train_moments(features_dir, cfg.data.id_dataset, model.num_classes, model.feature_dim, second)

        def load_train() -> tuple[np.ndarray, np.ndarray]:
            table = storage.read_table(features_dir / f"dataset={cfg.data.id_dataset}", ["features", "label", "split"])
            table = table.filter(pc.equal(table.column("split"), "train"))
            return storage.vector_to_numpy(table.column("features")), table.column("label").to_numpy()

        fit.fit_detectors(detectors, moments, head, load_train)
        with fit_dir.writing() as tmp:
            fit.save_fitted(tmp, head, moments, detectors)
    else:
        fit.load_fitted_detectors(fit_dir, detectors)
    stages.record("fit", fit_dir, reused, time.time() - t0)

    # SCORE
    t0 = time.time()
    score_key = storage.content_key("score", score.STAGE_VERSION, fit=fit_key, embed=embed_key)
    score_dir = storage.stage_dir(cfg.output, cfg.experiment, "scores", score_key)
    reused = score_dir.done
    if not reused:
        score.run_score(features_dir, detectors, score_dir)
    stages.record("score", score_dir, reused, time.time() - t0)

    # EVALUATE (always runs: cheap, and every job run is logged)
    t0 = time.time()
    scores_df = storage.read_table(score_dir.path / "scores").to_pandas()
    scores_df["dataset"] = scores_df["dataset"].astype(str)
    rows = evaluate.ood_metric_rows(scores_df, cfg.data.id_dataset, cfg.data.ood_datasets) + evaluate.classify_rows(scores_df, cfg.data.id_dataset)
    metrics = evaluate.metrics_table(rows)
    eval_dir = storage.stage_dir(cfg.output, cfg.experiment, "metrics", score_key)
    with eval_dir.writing() as tmp:
        storage.write_table(metrics, tmp, "metrics.parquet")
        evaluate.plot_roc_and_histograms(scores_df, cfg.data.id_dataset, cfg.data.ood_datasets, tmp / "plots")
        (tmp / "results.md").write_text(evaluate.results_markdown(metrics.to_pandas()))
    stages.record("evaluate", eval_dir, False, time.time() - t0)

    # MLflow (driver only)
    run_id = uuid.uuid4().hex[:12]
    mlflow_run_id, uri = None, None
    metrics_df = metrics.to_pandas()
    if cfg.mlflow.enabled:
        uri = tracking.tracking_uri(cfg.mlflow.tracking_uri, Path(cfg.output))
        tags = {
            "schedule": schedule or cfg.schedule, "git_sha": tracking.git_sha(), "model_hash": model_hash,
            "manifest_hash": manifest_hash, "config_hash": cfg.digest(), "oodlib_run_id": run_id, "model": cfg.model.name,
        }
        with tracking.start_parent(uri, cfg.experiment, f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}", tags) as parent:
            mlflow_run_id = parent.info.run_id
            import mlflow

            mlflow.log_params({"config": config_path, "model": cfg.model.name, "id_dataset": cfg.data.id_dataset, "ood_datasets": ",".join(cfg.data.ood_datasets)})
            acc = metrics_df[metrics_df.task == "classify"]
            mlflow.log_metrics({f"acc.{r.dataset.replace('/', '.')}": r.value for r in acc.itertuples()})
            mlflow.log_metrics({f"count.{k}": v for k, v in stages.counts["embed"].items() if k != "seconds"})
            mlflow.log_artifact(str(eval_dir.path / "metrics.parquet"))
            mlflow.log_artifact(str(eval_dir.path / "results.md"))
            for key, det in detectors.items():
                rows_k = metrics_df[(metrics_df.task == "ood") & (metrics_df.method == key)]
                tracking.log_child(key, tags, {"detector": det.name, **det.params()}, rows_k, [eval_dir.path / "plots" / f"{key}.png"])

    summary = {
        "run_id": run_id, "experiment": cfg.experiment, "config": config_path, "config_hash": cfg.digest(),
        "mlflow_run_id": mlflow_run_id, "tracking_uri": uri, "manifest": str(manifest_path), "manifest_hash": manifest_hash,
        "model_hash": model_hash, "stages": stages.paths, "reused": stages.reused, "seconds": stages.seconds,
        "counts": stages.counts, "total_seconds": round(time.time() - started, 2),
    }
    exp_root.mkdir(parents=True, exist_ok=True)
    (exp_root / "last_run.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, metrics_df)
    return summary


def print_summary(summary: dict, metrics_df: pd.DataFrame) -> None:
    print("\n" + evaluate.results_markdown(metrics_df))
    c = summary["counts"].get("embed", {})
    print(f"\nimages: {c.get('input')} in, {c.get('features')} embedded, {c.get('quarantined')} quarantined")
    print(f"outputs: {Path(summary['stages']['evaluate']).parent.parent} (last_run.json lists every stage path)")
    if summary["tracking_uri"]:
        print(f"MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
        print(f"  look at it: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1")
    print(f"done in {summary['total_seconds']:.1f}s")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job config YAML (e.g. configs/digits.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--schedule", default=None, help="tag for the MLflow runs (manual, nightly, …)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        run(cfg, args.schedule, args.config)
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"error: model.weights: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
