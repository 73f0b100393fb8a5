"""ERRORS: wrong-prediction risk — the conductance error detector, LCR (and its SPRT), their fusions.

Reads the ``conductance``/``lcr`` columns EMBED wrote for the ID splits and the labelled extra
sets, splits the rows into the detector's fit/val/test parts (:func:`assign_parts`), fits and
evaluates every detector (:func:`oodlib.errors.fit_and_evaluate`), and writes the ``risks``
table, the seed paper's tables (4–6 and 3) and the AUROC-vs-mutants figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import JobConfig
from jobs.stages.base import Child, Context, Stage, StageResult, per_set_metrics, rows_of
from oodlib.errors import SPRT, auroc_vs_mutants, error_table, fit_and_evaluate, group_split, lcr_table, to_long_metrics
from oodlib.reporting.errors import plot_auroc_vs_mutants
from oodlib.reporting.tables import error_markdown

SPLITS = ("fit", "val", "test")


def assign_parts(df: pd.DataFrame, id_dataset: str, seed: int) -> np.ndarray:
    """fit/val/test per row: the ID splits as they are (train → fit); extra labelled sets by
    source image (the last component of the image id), so corrupted twins stay together."""
    part = np.full(len(df), "", dtype=object)
    is_id = (df.dataset == id_dataset).to_numpy()
    part[is_id] = df.split.to_numpy()[is_id]
    part[part == "train"] = "fit"
    extra = ~is_id
    if extra.any():
        groups = df.dataset.to_numpy()[extra] + ":" + np.array([i.rsplit("/", 1)[1] for i in df.image_id.to_numpy()[extra]])
        part[extra] = group_split(groups, seed=seed)
    return part.astype(str)


def validation_part(cfg: JobConfig, rows: pa.Table) -> pa.Table:
    """The manifest rows in the ``val`` part: ID val plus the val groups of the extra sets."""
    sets = rows_of(rows, [cfg.data.id_dataset, *cfg.errors.extra_datasets])
    ids = sets.select(["image_id", "dataset", "split"]).to_pandas()
    ids["dataset"] = ids["dataset"].astype(str)
    return sets.filter(pa.array(assign_parts(ids, cfg.data.id_dataset, cfg.errors.seed) == "val"))


@dataclass
class ErrorsResult(StageResult):
    table: pd.DataFrame

    def metrics(self) -> pd.DataFrame:
        return self.table

    def children(self, ctx: Context) -> list[Child]:
        rows = self.table
        return [Child(f"error/{method}", {"errors": ctx.cfg.errors.model_dump_json()},
                      per_set_metrics(g))
                for method, g in rows.groupby("method", sort=False)]


class ErrorsStage(Stage):
    name = "errors"
    version = 3

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.errors.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("embed", "mutants")

    def key(self, ctx: Context, up: dict) -> dict:
        return {"features": sorted(up["embed"].features), "errors": ctx.cfg.errors.model_dump(), "id": ctx.cfg.data.id_dataset,
                "tau": up["mutants"].tau}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        cfg, e, tau = ctx.cfg, ctx.cfg.errors, up["mutants"].tau
        df, vec = read_error_rows(up["embed"].feature_dirs, [cfg.data.id_dataset, *e.extra_datasets])
        part = assign_parts(df, cfg.data.id_dataset, e.seed)
        wrong = (df.pred != df.label).to_numpy()
        lcr = df.lcr.to_numpy()
        by = {s: part == s for s in SPLITS}
        print(f"[errors] fitting the error detectors on {int(by['fit'].sum())} rows "
              f"({int(wrong[by['fit']].sum())} wrong; val {int(by['val'].sum())}, test {int(by['test'].sum())})", flush=True)
        res = fit_and_evaluate(
            {s: vec["conductance"][by[s]] for s in SPLITS}, {s: lcr[by[s]] for s in SPLITS}, {s: wrong[by[s]] for s in SPLITS},
            seed=e.seed, epochs=e.detector_epochs,
        )
        risks = res.risks
        flips = vec["lcr_flips"] > 0.5 if "lcr_flips" in vec else None
        if flips is not None:  # post-hoc SPRT on the full flip matrix
            lcr_sprt, used = SPRT(tau).lcr(flips)
            risks["lcr_sprt"] = {s: lcr_sprt[by[s]] for s in ("val", "test")}
        else:  # EMBED already stopped early: lcr is the SPRT estimate
            lcr_sprt, used = lcr, df.lcr_mutants_used.to_numpy()
        table = error_table({m: (r["val"], r["test"]) for m, r in risks.items()}, wrong[by["val"]], wrong[by["test"]])

        all_risk = pd.DataFrame({"image_id": df.image_id, "dataset": df.dataset, "part": part, "wrong": wrong})
        all_risk["risk_conductance"] = res.conductance.risk(vec["conductance"])
        all_risk["risk_lcr"] = lcr.astype(np.float32)
        all_risk["risk_lcr_sprt"] = np.asarray(lcr_sprt, np.float32)
        for kind, det in res.fusions.items():
            all_risk[f"risk_fusion_{kind}"] = det.risk(np.column_stack([lcr, all_risk.risk_conductance]))
        m = e.mutants
        lcr_t3 = lcr_table([(m.operator, m.rate, lcr[by["test"]], wrong[by["test"]])])
        metrics = pd.concat([to_long_metrics(table, "val").query("metric.str.startswith('val_')"),
                             to_long_metrics(table, "test").query("metric.str.startswith('test_')")], ignore_index=True)
        metrics["metric"] = metrics.metric.str.replace(r"^(val|test)_", "", regex=True)
        used_mean = float(np.mean(used))
        metrics = pd.concat([metrics, pd.DataFrame([{"task": "error", "method": "lcr_sprt", "dataset": "all",
                                                     "metric": "mutants_used_mean", "value": used_mean}])], ignore_index=True)
        for name, frame in (("risks", all_risk), ("error_table", table), ("lcr_table", lcr_t3), ("metrics", metrics)):
            storage.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, f"{name}.parquet")
        (tmp / "error_table.md").write_text(error_markdown(table, lcr_t3, used_mean, None if flips is None else flips.shape[1]))
        res.conductance.save(tmp / "conductance_detector.safetensors")
        for kind, det in res.fusions.items():
            det.save(tmp / f"fusion_{kind}.safetensors")
        if flips is not None:
            curve = auroc_vs_mutants(flips[by["test"]], wrong[by["test"]])
            storage.write_table(pa.Table.from_pandas(curve, preserve_index=False), tmp, "auroc_vs_mutants.parquet")
            plot_auroc_vs_mutants({f"{m.operator} {m.rate}": curve}, tmp / "auroc_vs_mutants.png")

    def load(self, ctx: Context, up: dict, path: Path) -> ErrorsResult:
        return ErrorsResult(path, pq.read_table(path / "metrics.parquet").to_pandas())


def read_error_rows(feature_dirs: list[Path], datasets: list[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The error-relevant columns of the features table for ``datasets``: (rows, {vector column: N×K})."""
    cols = ["image_id", "dataset", "split", "label", "pred", "conductance", "lcr", "lcr_mutants_used"]
    first = next(p for d in feature_dirs for p in Path(d).rglob("*.parquet"))
    if "lcr_flips" in pq.read_schema(first).names:
        cols.append("lcr_flips")
    table = storage.read_table(feature_dirs, cols, filter=pc.field("dataset").isin(datasets))
    table = table.sort_by("image_id")  # one order whatever the shard layout: the detectors' training depends on it
    vectors = {c: storage.vector_to_numpy(table.column(c)) for c in ("conductance", "lcr_flips") if c in table.column_names}
    df = table.drop_columns(list(vectors)).to_pandas()
    df["dataset"] = df["dataset"].astype(str)
    return df, vectors
