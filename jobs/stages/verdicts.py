"""VERDICTS: calibrated thresholds, one verdict per input image, flag rates and drift per batch.

* Thresholds (``thresholds.parquet``): for every detector column, the score keeping
  ``verdicts.target_tpr`` of the ID val split (flag OOD when score < threshold), and for every
  risk the threshold leaving ``verdicts.risk_keep_correct`` of the correct predictions of the
  validation part unflagged (or reaching ``risk_recall`` of the wrong ones; flag when risk ≥
  threshold) — each with a bootstrap 95% interval, and the ID test flag rate it gives (the honest
  check of the calibration).
* The primary detector and risk: configured, or the best by the validation metrics (the reason
  is stated in ``primary.json``).
* ``verdicts.parquet``: one row per input image — quarantined ones included, flagged with reason
  ``quarantined: <why>``; the fitting data SCORE does not score (ID train, the graph's sets) with
  verdict ``unscored`` — with the primary score and risk, their thresholds, the flags and reasons.
* ``batches.parquet``: per incoming dataset and batch, the flag rate with its Wilson interval, a
  classifier two-sample test of the batch's features against ID val and a KS test of its primary
  scores; plus the ID test rows (the expected rate).
The alert over the nights and the report are made after the run (:mod:`jobs.report`): they
depend on earlier nights, which a content-keyed stage must not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import JobConfig
from jobs.runtime import init_ray
from jobs.stages.base import Child, Context, Stage, StageResult
from jobs.stages.manifest import ManifestResult
from jobs.workers import cluster_cpus, ordered_map
from oodlib.verdicts import (
    choose_primary,
    classifier_drift_test,
    flag_rate_table,
    image_verdicts,
    ks_drift_test,
    ood_threshold,
    risk_threshold,
)

RISK_PARTS = ("val",)
UNSCORED = "unscored"


@dataclass
class VerdictsResult(StageResult):
    verdicts: pd.DataFrame
    batches: pd.DataFrame
    thresholds: pd.DataFrame
    primary: dict

    def counts(self) -> dict:
        return {"images": len(self.verdicts), "flagged": int(self.verdicts.flagged.sum()),
                "quarantined": int((self.verdicts.verdict == "quarantined").sum())}

    def tables(self) -> dict:
        # ``verdicts`` is published after EXPLAIN, with the pointers to the relevance maps (jobs.report)
        return {"thresholds": pa.Table.from_pandas(self.thresholds, preserve_index=False)}

    def children(self, ctx: Context) -> list[Child]:
        """One MLflow child: the primary thresholds, the ID test flag rates and the thresholds table."""
        t = self.thresholds.set_index(["kind", "name"])
        metrics = {}
        for kind, name in (("ood", self.primary["ood"]), ("risk", self.primary["risk"])):
            if name is None:
                continue
            row = t.loc[(kind, name)]
            rate = "id_test_flag_rate" if kind == "ood" else "test_flag_rate"
            metrics |= {f"{kind}.threshold": row.threshold, f"{kind}.threshold_lo": row.threshold_lo,
                        f"{kind}.threshold_hi": row.threshold_hi, f"{kind}.test_flag_rate": row[rate]}
        metrics |= {f"ood_test_flag_rate.{n}": r for (k, n), r in t.id_test_flag_rate.items() if k == "ood" and np.isfinite(r)}
        params = {"primary_ood": self.primary["ood"], "primary_risk": self.primary["risk"] or "(none)",
                  "verdicts": ctx.cfg.verdicts.model_dump_json()}
        return [Child("verdicts", params, metrics, [self.path / "thresholds.parquet", self.path / "primary.json"])]


class VerdictsStage(Stage):
    name = "verdicts"
    version = 1

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.verdicts.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest", "embed", "score", "evaluate", *(("errors",) if cfg.errors.enabled else ()))

    def key(self, ctx: Context, up: dict) -> dict:
        return {"scores": up["score"].path.name, "risks": up["errors"].path.name if "errors" in up else None,
                "metrics": up["evaluate"].path.name, "manifest": up["manifest"].path.name,
                "verdicts": ctx.cfg.verdicts.model_dump(), "id": ctx.cfg.data.id_dataset, "incoming": ctx.cfg.data.incoming_datasets}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        cfg = ctx.cfg
        scores = up["score"].read()
        risks = pd.read_parquet(up["errors"].path / "risks.parquet") if "errors" in up else None
        metrics = up["evaluate"].table if risks is None else pd.concat([up["evaluate"].table, up["errors"].table], ignore_index=True)
        ctx.progress(f"thresholds for {sum(c.startswith('score_') for c in scores.columns)} detectors"
                     + (f" and {sum(c.startswith('risk_') for c in risks.columns)} risks" if risks is not None else ""))
        # a detector fitted on ID val (ViM's residual, KL matching …) scores val in-sample: its
        # threshold there is biased, so it is marked and never chosen as the primary automatically
        fitted_on_val = sorted(k for k, det in ctx.build_detectors().items() if det.fit_split == "val")
        thresholds, fitted = calibrate(scores, risks, cfg, fitted_on_val)
        primary = primary_choice(cfg, metrics, fitted_on_val)
        verdicts = verdict_rows(scores, risks, up["manifest"], up["embed"], fitted, primary)
        batches = batch_table(ctx, verdicts, scores, up["embed"].feature_dirs)
        storage.write_table(pa.Table.from_pandas(thresholds, preserve_index=False), tmp, "thresholds.parquet")
        storage.write_table(verdicts_arrow(verdicts), tmp, "verdicts.parquet")
        storage.write_table(pa.Table.from_pandas(batches, preserve_index=False), tmp, "batches.parquet")
        (tmp / "primary.json").write_text(json.dumps(primary, indent=1))

    def load(self, ctx: Context, up: dict, path: Path) -> VerdictsResult:
        primary = json.loads((path / "primary.json").read_text())
        verdicts = pq.read_table(path / "verdicts.parquet").to_pandas()
        incoming = verdicts[verdicts.dataset.isin(ctx.cfg.data.incoming_datasets)]
        id_test = verdicts[(verdicts.dataset == ctx.cfg.data.id_dataset) & (verdicts.split == "test")]
        ctx.progress(f"primary: {primary['ood']} (OOD) and {primary['risk'] or 'no risk'}; flagged: "
                     f"{int(id_test.flagged.sum())} of {len(id_test)} ID test images"
                     + (f", {int(incoming.flagged.sum())} of {len(incoming)} incoming" if len(incoming) else ""))
        return VerdictsResult(path, verdicts, pd.read_parquet(path / "batches.parquet"), pd.read_parquet(path / "thresholds.parquet"),
                              primary)


def calibrate(scores: pd.DataFrame, risks: pd.DataFrame | None, cfg: JobConfig,
              fitted_on_val: list[str] = ()) -> tuple[pd.DataFrame, dict]:
    """Every detector's and risk's threshold (a table; the fitted threshold objects by column).
    ``fitted_on_val``: detectors whose fit used the ID val split (column ``fitted_on_val``: their
    threshold is in-sample, their ``id_test_flag_rate`` shows by how much)."""
    v, id_dataset = cfg.verdicts, cfg.data.id_dataset
    val = scores[(scores.dataset == id_dataset) & (scores.split == "val")]
    test = scores[(scores.dataset == id_dataset) & (scores.split == "test")]
    if val.empty:
        raise ValueError(f"verdicts: the ID dataset {id_dataset!r} has no val split to calibrate the thresholds on")
    rows, fitted = [], {}
    for column in [c for c in scores.columns if c.startswith("score_")]:
        t = ood_threshold(val[column].to_numpy(), v.target_tpr, v.n_boot, v.seed, n_new=len(test))
        fitted[column] = t
        name = column.removeprefix("score_")
        rows.append({"kind": "ood", "name": name, "fitted_on_val": name in fitted_on_val, **t.to_dict(),
                     "id_test_flag_rate": float(t.flag(test[column].to_numpy()).mean()) if len(test) else np.nan})
    if risks is not None:
        part = risks[risks.part.isin(RISK_PARTS)]
        test_part = risks[risks.part == "test"]
        for column in [c for c in risks.columns if c.startswith("risk_")]:
            t = risk_threshold(part[column].to_numpy(), part.wrong.to_numpy(bool), v.risk_recall, v.n_boot, v.seed, v.risk_keep_correct)
            fitted[column] = t
            rows.append({"kind": "risk", "name": column.removeprefix("risk_"), "fitted_on_val": False, **t.to_dict(),
                         "test_flag_rate": float(t.flag(test_part[column].to_numpy()).mean()) if len(test_part) else np.nan})
    return pd.DataFrame(rows), fitted


def primary_choice(cfg: JobConfig, metrics: pd.DataFrame, fitted_on_val: list[str] = ()) -> dict:
    """{"ood", "risk", "why"}: the configured primary detector/risk, or the best by the validation
    metrics among the detectors not fitted on ID val."""
    v = cfg.verdicts
    chosen = choose_primary(metrics, exclude=tuple(fitted_on_val))
    ood = v.primary_detector or chosen.ood
    risk = v.primary_risk or (chosen.risk if cfg.errors.enabled else None)
    why = [f"OOD: {'configured (verdicts.primary_detector)' if v.primary_detector else chosen.ood_reason}"]
    if risk is not None:
        why.append(f"risk: {'configured (verdicts.primary_risk)' if v.primary_risk else chosen.risk_reason}")
    return {"ood": ood, "risk": risk, "why": why}


def verdict_rows(scores: pd.DataFrame, risks: pd.DataFrame | None, manifest: ManifestResult, embed, fitted: dict,
                 primary: dict) -> pd.DataFrame:
    """One row per input image: the scored ones (:func:`oodlib.verdicts.image_verdicts` with the
    primary detector and risk) and the quarantined ones (verdict ``quarantined``, flagged)."""
    ood_column = f"score_{primary['ood']}"
    risk, risk_values = None, None
    if primary["risk"] is not None and risks is not None:
        risk = fitted[f"risk_{primary['risk']}"]
        by_id = risks.set_index("image_id")[f"risk_{primary['risk']}"]
        risk_values = scores.image_id.map(by_id).to_numpy(np.float64)  # NaN: a row without a risk (an OOD set)
    v = image_verdicts(scores.image_id, scores[ood_column], fitted[ood_column], risk_values, risk, primary["ood"],
                       primary["risk"] or "risk")
    out = scores[["image_id", "dataset", "batch", "split", "subset", "label", "pred"]].reset_index(drop=True)
    out = pd.concat([out, v.drop(columns="image_id")], axis=1)
    out["score_threshold"] = fitted[ood_column].threshold
    out["risk_threshold"] = np.nan if risk is None else risk.threshold
    q = quarantined_rows(manifest, embed)
    rest = unscored_rows(manifest, set(out.image_id) | set(q.image_id if len(q) else ()))
    return pd.concat([part for part in (out, q, rest) if len(part)], ignore_index=True)


def unscored_rows(manifest: ManifestResult, judged: set) -> pd.DataFrame:
    """Verdict rows of the usable images SCORE does not score (:func:`jobs.rows.scored_rows`: the
    ID train split and the graph's sets — fitting data): verdict ``unscored``, not flagged."""
    rows = manifest.rows.select(["image_id", "dataset", "batch", "split", "label"])
    rows = rows.filter(pa.compute.invert(pa.compute.is_in(rows.column("image_id"), pa.array(list(judged), pa.string()))))
    return unjudged_rows(rows.to_pandas(), UNSCORED, False, [[] for _ in range(rows.num_rows)],
                         "not scored: fitting data (SCORE scores the ID val and test splits, the OOD, extra and incoming sets)")


def quarantined_rows(manifest: ManifestResult, embed) -> pd.DataFrame:
    """Verdict rows of the images that could not be used (manifest or decode): flagged, with the
    reason; the batch of an image EMBED could not decode comes from the manifest rows."""
    manifest_quarantine = manifest.quarantined
    parts = [manifest_quarantine.to_pandas()]
    parts += [storage.read_table(d).to_pandas() for d in embed.quarantine if storage.committed_rows(d)]
    q = pd.concat(parts, ignore_index=True)
    if q.empty:
        return q
    batch_of = manifest.rows.select(["image_id", "batch"]).to_pandas().set_index("image_id").batch
    images = pd.DataFrame({"image_id": q.image_id, "dataset": q.dataset, "batch": q.image_id.map(batch_of), "split": q.split, "label": -1})
    return unjudged_rows(images, "quarantined", True, [[f"quarantined:{r}"] for r in q.reason], [f"quarantined: {r}" for r in q.reason])


def unjudged_rows(images: pd.DataFrame, verdict: str, flagged: bool, reasons: list[list[str]], why) -> pd.DataFrame:
    """Verdict rows of images no detector judged (``images``: image_id, dataset, batch, split,
    label): no prediction, score or risk; the given verdict, flag, reasons and ``why``."""
    n = len(images)
    return pd.DataFrame({
        "image_id": images.image_id.astype(str).to_numpy(), "dataset": images.dataset.astype(str).to_numpy(),
        "batch": images.batch.fillna("").astype(str).to_numpy(), "split": images.split.astype(str).to_numpy(), "subset": "",
        "label": images.label.fillna(-1).astype(int).to_numpy(), "pred": -1,
        "score": np.nan, "risk": np.nan, "is_ood": np.zeros(n, bool), "likely_wrong": np.zeros(n, bool), "flagged": flagged,
        "verdict": verdict, "reasons": reasons, "why": why, "score_threshold": np.nan, "risk_threshold": np.nan})


def batch_table(ctx: Context, verdicts: pd.DataFrame, scores: pd.DataFrame, feature_dirs: list[Path]) -> pd.DataFrame:
    """Flag rates (Wilson intervals) per incoming dataset and batch, with drift tests against ID
    val, and the ID test rows (dataset = the ID dataset, batch ``""``: the expected rate).

    Columns: dataset, batch, n, k, rate, lo, hi (any flag), ood_rate/ood_lo/ood_hi (OOD flags),
    c2st_p (classifier two-sample test of the penultimate features), ks_p (KS test of the primary
    score), quarantined (images of the batch that could not be scored, not in n)."""
    cfg = ctx.cfg
    id_dataset = cfg.data.id_dataset
    scored = verdicts[verdicts.verdict != "quarantined"]
    groups = scored[scored.dataset.isin(cfg.data.incoming_datasets) | ((scored.dataset == id_dataset) & (scored.split == "test"))]
    groups = groups.assign(batch=np.where(groups.dataset == id_dataset, "", groups.batch))
    table = flag_rate_table(groups, "flagged", ("dataset", "batch"))
    ood_table = flag_rate_table(groups, "is_ood", ("dataset", "batch"))
    table["ood_rate"], table["ood_lo"], table["ood_hi"] = ood_table.rate, ood_table.lo, ood_table.hi
    ids, features = read_features(feature_dirs, {id_dataset: ("val",), **{d: None for d in cfg.data.incoming_datasets}})
    val_ids = scores[(scores.dataset == id_dataset) & (scores.split == "val")].image_id
    reference = features[ids.isin(val_ids)]
    ref_scores = verdicts.set_index("image_id").loc[val_ids, "score"].to_numpy()
    incoming = [(d, b) for d, b in zip(table.dataset, table.batch) if d != id_dataset]
    rows = {(d, b): groups[(groups.dataset == d) & (groups.batch == b)] for d, b in incoming}
    ctx.progress(f"drift of {len(incoming)} incoming batches against ID val ({len(reference)} images)")
    c2st = dict(zip(incoming, c2st_p_values(ctx, reference, [features[ids.get_indexer(rows[k].image_id)] for k in incoming])))
    table["c2st_p"] = [c2st.get(k, np.nan) for k in zip(table.dataset, table.batch)]
    table["ks_p"] = [ks_drift_test(ref_scores, rows[k].score.to_numpy()).p_value if k in rows else np.nan
                     for k in zip(table.dataset, table.batch)]
    held = verdicts[verdicts.verdict == "quarantined"].groupby(["dataset", "batch"]).size()
    table["quarantined"] = [int(held.get((d, b), 0)) for d, b in zip(table.dataset, table.batch)]
    return table


def c2st_p_values(ctx: Context, reference: np.ndarray, batches: list[np.ndarray]) -> list[float]:
    """The C2ST p-value (:func:`oodlib.verdicts.classifier_drift_test`) of each batch's features
    against ``reference``: one Ray task per batch, spread over the cluster's CPUs."""
    import ray

    if not batches:
        return []
    init_ray()
    v = ctx.cfg.verdicts
    task, ref = ray.remote(num_cpus=1)(classifier_drift_test), ray.put(reference)
    tests = ordered_map(lambda x: task.remote(ref, x, v.drift_max_rows, v.drift_permutations, seed=v.seed), batches,
                        2 * cluster_cpus(), ctx.cfg.runtime.stall_timeout_s, "VERDICTS (a drift test per batch)")
    return [t.p_value for t in tests]


def read_features(feature_dirs: list[Path], parts: dict[str, tuple[str, ...] | None]) -> tuple[pd.Index, np.ndarray]:
    """(image ids, N×D penultimate features) of the rows of ``parts`` ({dataset: its splits, None =
    all}), read batch by batch: only those files, those rows and those two columns."""
    dataset, ids, vectors = storage.committed_dataset(feature_dirs), [], []
    for batch in dataset.to_batches(columns=["image_id", "features"], filter=storage.rows_filter(parts)):
        ids += batch.column("image_id").to_pylist()
        vectors.append(storage.vector_to_numpy(batch.column("features")))
    width = dataset.schema.field("features").type.list_size
    return pd.Index(ids), np.concatenate(vectors) if vectors else np.zeros((0, width), np.float32)


def verdicts_arrow(verdicts: pd.DataFrame) -> pa.Table:
    """The verdicts as Arrow, ``reasons`` a ``list<string>`` column even when every list is empty."""
    table = pa.Table.from_pandas(verdicts.drop(columns=["reasons"]), preserve_index=False)
    return table.append_column("reasons", pa.array(verdicts.reasons.map(list).tolist(), pa.list_(pa.string())))
