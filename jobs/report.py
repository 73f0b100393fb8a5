"""After the stages: the batch history over the nights, the alert and the HTML report (issue #15).

VERDICTS (a content-keyed stage) assesses this run's incoming batches; what depends on earlier
nights is made here, once per run:

* the ``verdicts`` table (Delta, ``tables/verdicts``): VERDICTS' rows with ``relevance_maps``, the
  file of the image's maps when EXPLAIN computed them (it runs after VERDICTS: it explains the top
  flagged images);
* the ``batches`` table (Delta, ``tables/batches``): every incoming batch ever assessed, one row
  per (dataset, batch) — this run's rows replace the rows of the batches it assessed again —
  with the expected ID rate of the run that assessed it (``expected_*``);
* the alert (:func:`oodlib.verdicts.alert_history`) per incoming dataset, on the newest batch,
  against this run's ID test rate of flagged images (Wilson interval), with the feature (C2ST)
  and score (KS) drift p-values;
* ``reports/<stamp>-<run>/``: ``alert.json`` and ``report-<dataset>.html`` (one self-contained
  file per incoming dataset: verdict, thresholds, trend, top flagged images with relevance maps),
  logged to MLflow with the per-batch flag rates as metrics at step ``YYYYMMDD``.

``oodlib monitor`` re-reads the published ``batches`` table and decides again (exit 1 on alert).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs import publish, store
from jobs.config import JobConfig
from oodlib.verdicts import AlertDecision, alert_history, top_flagged

DRIFT_COLUMNS = ("c2st_p", "ks_p")
EXPECTED = ("expected_rate", "expected_lo", "expected_hi")


def expected_rate(batches: pd.DataFrame, id_dataset: str) -> tuple[float, float, float]:
    """(rate, lo, hi): the share of ID test images flagged, with its Wilson interval — the rate an
    incoming batch of ID data should show (VERDICTS' ``batches`` row of the ID dataset)."""
    row = batches[batches.dataset == id_dataset]
    if row.empty:
        raise ValueError(f"the verdicts have no ID test row for {id_dataset!r}: no expected flag rate")
    r = row.iloc[0]
    return float(r.rate), float(r.lo), float(r.hi)


def read_published(table_root: Path) -> pd.DataFrame | None:
    """The current version of a published table, or None when it was never published."""
    from deltalake import DeltaTable

    if not publish.is_table(table_root):
        return None
    return DeltaTable(store.uri(table_root)).to_pandas()


def batch_history(previous: pd.DataFrame | None, batches: pd.DataFrame, id_dataset: str, run_id: str) -> pd.DataFrame:
    """Earlier nights' batch rows ∪ this run's incoming batch rows (this run's replace a batch it
    assessed again), with this run's expected ID rate on its rows; sorted by dataset, batch."""
    expected = expected_rate(batches, id_dataset)
    now = batches[batches.dataset != id_dataset].assign(**dict(zip(EXPECTED, expected)), oodlib_run_id=run_id)
    if previous is not None and len(previous):
        assessed = set(zip(now.dataset, now.batch))
        keep = [(d, b) not in assessed for d, b in zip(previous.dataset, previous.batch)]
        now = pd.concat([previous[keep], now], ignore_index=True)
    return now.sort_values(["dataset", "batch"], kind="stable").reset_index(drop=True)


def decisions(history: pd.DataFrame, margin: float, alpha: float) -> dict[str, list[AlertDecision]]:
    """Per incoming dataset: the decision for each of its batches, oldest first (the last is the
    newest night's), against the expected rate of the run that assessed the newest batch."""
    out = {}
    for dataset, rows in history.groupby("dataset", sort=True):
        newest = rows.sort_values("batch").iloc[-1]
        out[str(dataset)] = alert_history(rows.reset_index(drop=True), newest.expected_rate, newest.expected_hi, margin, alpha,
                                          DRIFT_COLUMNS)
    return out


def alert_summary(by_dataset: dict[str, list[AlertDecision]]) -> dict:
    """``{"fire", "datasets": {dataset: newest decision as a dict}}`` (what ``alert.json`` holds)."""
    newest = {d: ds[-1].to_dict() for d, ds in by_dataset.items() if ds}
    return {"fire": any(d["fire"] for d in newest.values()), "datasets": newest}


def batch_metrics(history: pd.DataFrame) -> list[tuple[str, float, int]]:
    """MLflow metrics (key, value, step) per batch: flag rate and bounds, OOD rate, drift
    p-values; the step is the batch date as YYYYMMDD (a batch that is not a date is skipped)."""
    out = []
    for r in history.itertuples(index=False):
        date = pd.to_datetime(str(r.batch), errors="coerce")
        if pd.isna(date):
            continue
        step = int(date.strftime("%Y%m%d"))
        for name in ("rate", "lo", "hi", "ood_rate", *DRIFT_COLUMNS):
            value = getattr(r, name)
            if value is not None and np.isfinite(value):
                out.append((f"batch.{r.dataset}.{name}", float(value), step))
    return out


def flagged_cards(cfg: JobConfig, verdicts: pd.DataFrame, manifest_rows: pa.Table, maps: pd.DataFrame | None, model,
                  dataset: str) -> dict[str, list[dict]]:
    """{batch: the ``verdicts.top_k`` flagged images to show} of one incoming dataset, each with
    its input (as the model saw it) and, when EXPLAIN computed one, its relevance map."""
    from oodlib.attribution.maps import display_images
    from oodlib.data.decode import decode_batch

    incoming = verdicts[(verdicts.dataset == dataset) & (verdicts.verdict != "quarantined")]
    picked = {b: top_flagged(rows, cfg.verdicts.top_k) for b, rows in incoming.groupby("batch", sort=True)}
    ids = [i for rows in picked.values() for i in rows.image_id]
    if not ids:
        return {b: [] for b in picked}
    table = manifest_rows.filter(pa.compute.is_in(manifest_rows.column("image_id"), pa.array(ids)))
    position = {iid: i for i, iid in enumerate(table.column("image_id").to_pylist())}
    x, _ = decode_batch(table.column("image").to_pylist(), table.column("path").to_pylist(), model.preprocess,
                        cfg.data.max_image_bytes)
    pictures = display_images(x.numpy(), model.preprocess)
    relevance = {}
    if maps is not None and len(maps):
        method = cfg.explain.methods[0]
        for r in maps[maps.method == method].itertuples(index=False):
            relevance[r.image_id] = np.asarray(r.map, np.float32).reshape(r.height, r.width)
    return {b: [{**rec, "image": pictures[position[rec["image_id"]]], "relevance": relevance.get(rec["image_id"])}
                for rec in rows.to_dict("records")] for b, rows in picked.items()}


def nightly_report(ctx, results: dict, metrics: pd.DataFrame, meta: dict) -> dict:
    """Publish the verdicts and the batch history, decide the alert and write the reports (see
    the module docstring). Returns ``{"alert", "report_dir", "reports", "versions": {table:
    version}, "batch_metrics"}``."""
    from oodlib.reporting.html import error_results_frame, ood_results_frame, render_report

    cfg, v = ctx.cfg, ctx.cfg.verdicts
    verdicts = results["verdicts"]
    table_root = ctx.root / "tables" / "batches"
    history = batch_history(read_published(table_root), verdicts.batches, cfg.data.id_dataset, meta["oodlib_run_id"])
    version = publish.publish_table(table_root, pa.Table.from_pandas(history, preserve_index=False), meta)
    by_dataset = decisions(history, v.margin, v.alpha)
    alert = alert_summary(by_dataset)
    out = ctx.root / "reports" / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{meta['oodlib_run_id']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "alert.json").write_text(json.dumps(alert, indent=2, allow_nan=False))
    maps, maps_file = None, None
    if "explain" in results and (results["explain"].path / "maps.parquet").exists():
        maps_file = results["explain"].path / "maps.parquet"
        maps = pd.read_parquet(maps_file)
    verdicts_version = publish.publish_table(ctx.root / "tables" / "verdicts",
                                             with_maps_pointer(verdicts.verdicts, maps, maps_file), meta)
    thresholds = verdicts.thresholds.set_index(["kind", "name"])
    expected = expected_rate(verdicts.batches, cfg.data.id_dataset)
    v_rows = verdicts.verdicts
    reports = []
    for dataset, decided in by_dataset.items():
        rows = history[history.dataset == dataset].sort_values("batch").reset_index(drop=True)
        context = {
            "title": f"Nightly verdict — {cfg.experiment} / {dataset}", "run_id": meta["oodlib_run_id"],
            "date": str(rows.batch.iloc[-1]), "model": cfg.model.name, "experiment": cfg.experiment,
            "counts": report_counts(v_rows, dataset),
            "primary": {"ood": verdicts.primary["ood"], "risk": verdicts.primary["risk"],
                        "ood_reason": verdicts.primary["why"][0], "risk_reason": " ".join(verdicts.primary["why"][1:])},
            "ood_threshold": threshold_dict(thresholds, "ood", verdicts.primary["ood"]),
            "risk_threshold": threshold_dict(thresholds, "risk", verdicts.primary["risk"]),
            "expected": expected, "expected_source": f"{cfg.data.id_dataset} test, any flag",
            "batches": rows, "decisions": decided, "drift_columns": DRIFT_COLUMNS,
            "flagged": flagged_cards(cfg, v_rows, results["manifest"].rows, maps, ctx.model, dataset),
            "ood_table": ood_results_frame(metrics), "error_table": error_results_frame(metrics) if cfg.errors.enabled else None,
            "quarantine": v_rows[v_rows.verdict == "quarantined"].why.value_counts().to_dict(),
        }
        reports.append(render_report(context, out / f"report-{dataset}.html"))
    store.upload(out, [p.name for p in sorted(out.iterdir()) if p.is_file()])
    print_alert(alert)
    return {"alert": alert, "report_dir": store.uri(out), "reports": [store.uri(p) for p in reports],
            "versions": {"batches": version, "verdicts": verdicts_version}, "batch_metrics": batch_metrics(history)}


def with_maps_pointer(verdicts: pd.DataFrame, maps: pd.DataFrame | None, maps_file: Path | None) -> pa.Table:
    """The verdicts as published: plus ``relevance_maps``, the Parquet file holding the image's
    relevance maps (one row per method; EXPLAIN's ``maps.parquet``), null when it was not explained."""
    from jobs.stages.verdicts import verdicts_arrow

    explained = set() if maps is None else set(maps.image_id)
    pointer = [store.uri(maps_file) if i in explained else None for i in verdicts.image_id]
    return verdicts_arrow(verdicts).append_column("relevance_maps", pa.array(pointer, pa.string()))


def threshold_dict(thresholds: pd.DataFrame, kind: str, name: str | None) -> dict | None:
    """One row of VERDICTS' ``thresholds`` table as the dict the report reads (None when absent)."""
    if name is None or (kind, name) not in thresholds.index:
        return None
    row = thresholds.loc[(kind, name)].to_dict()
    counts = {"n", "n_wrong", "n_boot", "n_boot_used", "seed"}  # integers the table's NaN padding made floats
    return {k: None if isinstance(x, float) and np.isnan(x) else int(x) if k in counts else x for k, x in row.items()}


def report_counts(verdicts: pd.DataFrame, dataset: str) -> dict[str, int]:
    """The report's headline numbers for one incoming dataset."""
    rows = verdicts[verdicts.dataset == dataset]
    scored = rows[rows.verdict != "quarantined"]
    return {"incoming images": len(rows), "batches": rows.batch.nunique(), "flagged OOD": int(scored.is_ood.sum()),
            "flagged likely wrong": int(scored.likely_wrong.sum()), "quarantined": int((rows.verdict == "quarantined").sum())}


def print_alert(alert: dict) -> None:
    for dataset, d in alert["datasets"].items():
        print(f"[alert] {dataset}: {d['reason']}", flush=True)
