"""The one pipeline loop: for each stage, content key → reuse or run → atomic commit → record
(seconds, counts) → MLflow; then the summary (``last_run.json``) and the printed tables.

Stages run in the order of :data:`STAGES`; a stage gets the typed results of the stages it
declares in ``needs`` and nothing else.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from jobs import publish, storage, store, tracking
from jobs.config import DetectorConfig, JobConfig
from jobs.extras import wanted_extras
from jobs.logs import Heartbeat
from jobs.plan import print_run_plan
from jobs.report import nightly_report
from jobs.sanity import result_warnings
from jobs.runtime import bound_heap, claim_scratch, clean_stale_scratch
from jobs.stages.base import Context, ShardFiles, Stage, StageResult
from jobs.stages.embed import EmbedStage
from jobs.stages.errors import ErrorsStage
from jobs.stages.evaluate import EvaluateStage
from jobs.stages.explain import ExplainStage
from jobs.stages.fit import FitStage
from jobs.stages.gaussianize import GaussianizeStage
from jobs.stages.graph import GraphStage
from jobs.stages.manifest import ManifestStage
from jobs.stages.mutants import MutantsStage
from jobs.stages.score import ScoreStage
from jobs.stages.verdicts import VerdictsStage
from oodlib.detectors import Head
from oodlib.models import ModelAdapter, load_model
from oodlib.reporting.tables import results_markdown

log = logging.getLogger("oodlib.pipeline")
STAGES: tuple[type[Stage], ...] = (
    ManifestStage, MutantsStage, GaussianizeStage, EmbedStage, FitStage, ScoreStage, EvaluateStage, ErrorsStage, VerdictsStage,
    GraphStage, ExplainStage,
)


@dataclass
class StageRecord:
    """What one stage did in this run."""

    name: str
    path: Path
    reused: bool
    seconds: float
    counts: dict


def plan(cfg: JobConfig, targets: tuple[str, ...] | None = None) -> list[Stage]:
    """Fresh instances of the enabled stages, in order; with ``targets`` only those and what they need."""
    stages = [cls() for cls in STAGES if cls().enabled(cfg)]
    if targets is None:
        return stages
    by_name = {s.name: s for s in stages}
    wanted, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs(cfg)
    return [s for s in stages if s.name in wanted]


def run_stages(ctx: Context, stages: list[Stage], tracker: tracking.Tracker) -> tuple[dict[str, StageResult], list[StageRecord]]:
    """The loop. Returns every stage's result and what each did."""
    results: dict[str, StageResult] = {}
    records = []
    for stage in stages:
        t0 = time.time()
        up = {n: results[n] for n in stage.needs(ctx.cfg)}
        with Heartbeat(stage.name) as beat:
            ctx.progress = beat.note
            target = stage.target(ctx, up)
            committed = target.committed()
            reused = committed and stage.intact(ctx, up, target.path)
            if committed and not reused:  # what it refers to was damaged: repair it
                log.warning("[%s] %s refers to damaged outputs; recomputing them", stage.name, target.path)
                storage.discard(target.path)
            if not reused:
                with target.writing() as tmp:
                    stage.run(ctx, up, tmp)
            result = results[stage.name] = stage.load(ctx, up, storage.fetch(target.path))
        ctx.progress = print
        rec = StageRecord(stage.name, target.path, reused, round(time.time() - t0, 2), result.counts())
        records.append(rec)
        counts = "".join(f", {k} {v}" for k, v in rec.counts.items())
        print(f"[{stage.name}] {'reused' if reused else 'computed'} in {rec.seconds:.1f}s{counts} → {store.uri(target.path)}", flush=True)
        tracker.stage(stage.name, rec.seconds, result.children(ctx))
    return results, records


def load_job_model(cfg: JobConfig) -> ModelAdapter:
    """The configured model on the driver (for hashing, the head, and shipping to actors)."""
    model = load_model(cfg.model.name, cfg.model.weights, cfg.model.num_classes)
    model.preprocess = cfg.model.preprocess(model.preprocess)
    return model


def run(
    cfg: JobConfig, schedule: str | None = None, config_path: str = "", detectors: list[DetectorConfig] | None = None,
    targets: tuple[str, ...] | None = None, overrides: list[str] = (),
) -> dict:
    """Run the job for ``cfg``; returns the summary written to ``{output}/{experiment}/last_run.json``.

    ``detectors``: the detector entries FIT/SCORE/EVALUATE use instead of the config's (a sweep's
    grid; EMBED's extras still follow the config, so the stored features are reused).
    ``targets``: run only these stages and what they need (a sweep: ``("evaluate",)``).
    ``overrides``: the ``--set`` items the config was loaded with (recorded in MLflow).
    """
    started = time.time()
    bound_heap()
    wanted_extras(cfg)  # detectors sharing an EMBED column must agree on it: a config error, before anything runs
    model = load_job_model(cfg)
    print_run_plan(cfg, model)  # the cost plan in a few lines; refuses a run over runtime.max_driver_memory_gb (exit 2)
    root = store.root_path(cfg.output) / cfg.experiment
    ctx = Context(cfg, model, model.weights_hash(), Head(*model.head_arrays()), root / ".scratch" / uuid.uuid4().hex[:8],
                  list(detectors or cfg.detectors))
    run_id = uuid.uuid4().hex[:12]
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri, store.root_path(cfg.output)) if cfg.mlflow.enabled else None
    tags = {"schedule": schedule or cfg.schedule, "git_sha": tracking.git_sha(), "model_hash": ctx.model_hash,
            "config_hash": cfg.digest(), "oodlib_run_id": run_id, "model": cfg.model.name}
    import yaml

    resolved = cfg.model_dump(mode="json")
    params = {"config": config_path, "overrides": " ".join(overrides) or "(none)", **tracking.flat_params(resolved)}
    config_yaml = f"# {config_path or '(config object)'} with --set {' '.join(overrides) or '(none)'}\n" + yaml.safe_dump(resolved, sort_keys=False)
    tracker = tracking.Tracker(uri, cfg.experiment, tags, params, config_yaml)
    clean_stale_scratch(ctx.scratch.parent)
    claim_scratch(ctx.scratch)
    try:
        results, records = run_stages(ctx, plan(cfg, targets), tracker)
        summary = job_summary(ctx, run_id, config_path, results, records, started)
        summary.update(mlflow_run_id=tracker.parent_id(), tracking_uri=tracking.redact_uri(uri))
        metrics = all_metrics(results)
        summary["warnings"] = run_warnings(ctx, results, metrics)
        artifacts = [results["evaluate"].path / "metrics.parquet", results["evaluate"].path / "results.md"] if "evaluate" in results else []
        if targets is None:  # a partial run (a sweep) does not publish
            meta = publish.metadata(run_id, cfg.digest(), mlflow_run_id=summary["mlflow_run_id"])
            summary["tables"] = publish_tables(ctx, results, metrics, meta)
            if "verdicts" in results:
                nightly = nightly_report(ctx, results, metrics, meta)
                tracker.steps(nightly.pop("batch_metrics"))
                summary["tables"] |= {name: {"path": store.uri(ctx.root / "tables" / name), "version": v}
                                      for name, v in nightly.pop("versions").items()}
                summary.update(nightly)
                artifacts += [store.local_path(nightly["report_dir"]) / "alert.json", *map(store.local_path, nightly["reports"])]
        acc = metrics[metrics.task == "classify"]
        tracker.finish(
            {**{f"acc.{r.dataset.replace('/', '.')}": r.value for r in acc.itertuples()},
             **{f"count.{k}": v for k, v in summary["images"].items()},
             **({"alert": float(summary["alert"]["fire"])} if "alert" in summary else {})},
            artifacts, summary,
        )
    except BaseException:
        tracker.fail()
        raise
    finally:
        store.delete(ctx.scratch)  # and what workers uploaded of it
    summary["total_seconds"] = round(time.time() - started, 2)  # publishing, report and tracking included
    write_run_record(root, summary)
    print_summary(summary, metrics)
    return summary


def publish_tables(ctx: Context, results: dict[str, StageResult], metrics: pd.DataFrame, meta: dict) -> dict:
    """Commit this run's version of every published table; returns {name: {path, version}}."""
    from jobs.stages.evaluate import METRICS_SCHEMA

    small: dict[str, list[pa.Table]] = {"metrics": [pa.Table.from_pandas(metrics, schema=METRICS_SCHEMA, preserve_index=False)]}
    sharded: dict[str, ShardFiles] = {}
    for result in results.values():
        for name, table in result.tables().items():
            if isinstance(table, ShardFiles):
                sharded[name] = table
            else:
                small.setdefault(name, []).append(table)
    out = {}
    for name, files in sharded.items():
        out[name] = publish.publish_shards(ctx.root / "tables" / name, files.shards, files.sub, meta)
    for name, parts in small.items():
        out[name] = publish.publish_table(ctx.root / "tables" / name, pa.concat_tables(parts, promote_options="default"), meta)
    print("[publish] " + ", ".join(f"{n} v{v}" for n, v in sorted(out.items())) + f" in {store.uri(ctx.root / 'tables')}", flush=True)
    return {name: {"path": store.uri(ctx.root / "tables" / name), "version": v} for name, v in sorted(out.items())}


def run_warnings(ctx: Context, results: dict[str, StageResult], metrics: pd.DataFrame) -> list[str]:
    """:mod:`jobs.sanity` over this run's results (and the explain stage's own warnings)."""
    sizes = {}
    if "score" in results:
        scored = results["score"].read(["dataset", "split"])
        id_test = scored[(scored.dataset == ctx.cfg.data.id_dataset) & (scored.split == "test")]
        sizes = {f"{ctx.cfg.data.id_dataset} test": len(id_test),
                 **{d: int((scored.dataset == d).sum()) for d in ctx.cfg.data.ood_datasets}}
    extra = getattr(results.get("explain"), "warnings", [])
    return result_warnings(metrics, sizes, ctx.cfg.data.id_dataset, ctx.model.num_classes) + list(extra)


def write_run_record(root: Path, summary: dict) -> None:
    """``last_run.json`` and the run's record in ``runs/`` (what ``oodlib gc`` keeps by), in the store."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    store.write_text(root / "runs" / f"{stamp}-{summary['run_id']}.json", json.dumps(summary, indent=2))
    store.write_text(root / "last_run.json", json.dumps(summary, indent=2))


def all_metrics(results: dict[str, StageResult]) -> pd.DataFrame:
    """Every stage's metrics rows in one table (task, method, dataset, metric, value)."""
    parts = [m for r in results.values() if (m := r.metrics()) is not None]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["task", "method", "dataset", "metric", "value"])


def job_summary(ctx: Context, run_id: str, config_path: str, results: dict, records: list[StageRecord], started: float) -> dict:
    """The run's record: ids and hashes, what each stage did, and the image counts
    (input = embedded + quarantined, manifest and EMBED quarantine together)."""
    cfg, manifest = ctx.cfg, results["manifest"]
    embed = results["embed"].counts() if "embed" in results else {"features": 0, "quarantined": 0}
    images = {"input": manifest.counts()["input"], "features": embed["features"],
              "quarantined": manifest.counts()["quarantined"] + embed["quarantined"]}
    summary = {
        "run_id": run_id, "experiment": cfg.experiment, "config": config_path, "config_hash": cfg.digest(),
        "manifest": manifest.source, "manifest_hash": manifest.hash(), "model_hash": ctx.model_hash,
        "stages": {r.name: store.uri(r.path) for r in records}, "reused": {r.name: r.reused for r in records},
        "seconds": {r.name: r.seconds for r in records}, "counts": {r.name: r.counts for r in records if r.counts},
        "images": images, "total_seconds": round(time.time() - started, 2),
    }
    embed_rec = next((r for r in records if r.name == "embed"), None)
    if embed_rec is not None and not embed_rec.reused and embed_rec.seconds > 0 and embed.get("images_embedded"):
        summary["throughput_images_per_s"] = round(embed["images_embedded"] / embed_rec.seconds, 1)
    return summary


def print_summary(summary: dict, metrics: pd.DataFrame) -> None:
    print("\n" + results_markdown(metrics))
    i, c = summary["images"], summary["counts"].get("embed", {})
    print(f"\nimages: {i['input']} in, {i['features']} embedded, {i['quarantined']} quarantined"
          + (f"; EMBED {summary['throughput_images_per_s']} images/s" if "throughput_images_per_s" in summary else ""))
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    if c:
        print(f"shards: recomputed {c.get('shards_recomputed')} of {c.get('shards_total')} (EMBED)")
    print(f"outputs: {summary['stages']['manifest'].rsplit('/', 2)[0]} (last_run.json lists every stage path)")
    if summary["tracking_uri"]:
        print(f"MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
        print(f"  look at it: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1")
    for w in summary.get("warnings", []):
        print(f"warning: {w}")
    print(f"done in {summary['total_seconds']:.1f}s")
