"""ERRORS: wrong-prediction risk — the conductance error detector, LCR (and its SPRT), their fusions
— and failure detection the FD-Shifts way.

Reads the ``conductance``/``lcr`` columns EMBED wrote for the ID splits and the labelled extra
sets, splits the rows into the detector's fit/val/test parts (:func:`assign_parts`), fits and
evaluates every detector (:func:`oodlib.errors.fit_and_evaluate`), and writes the ``risks``
table, the seed paper's tables (4–6 and 3) and the AUROC-vs-mutants figure.

Failure detection (:func:`failure_detection`): every error detector (confidence = 1 − risk) and
the logit baselines of :mod:`oodlib.errors.failure` (from the stored logits; temperatures and
Platt scaling fitted on the val part) on each failure source — ``iid`` (the ID test part),
``corruption/<set>`` (the test part of each labelled extra set) and ``new-class/<set>`` (the
correct ID test predictions plus an OOD set, every OOD image a failure) — with bootstrap
intervals: the ``failure`` metrics rows, ``failure.md`` and one risk–coverage PNG per source.
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
from oodlib.errors.failure import LOGIT_METHODS, PROBABILITY_LOGIT_METHODS, FailureSource, LogitConfidences, calibrate, failure_table
from oodlib.metrics import rc_curve
from oodlib.reporting.errors import plot_auroc_vs_mutants
from oodlib.reporting.failure import plot_risk_coverage
from oodlib.reporting.tables import error_markdown, failure_markdown

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

    def tables(self) -> dict:
        return {"risks": pq.read_table(self.path / "risks.parquet")}

    def children(self, ctx: Context) -> list[Child]:
        """One child per method: its wrong-prediction metrics (``val.*``, ``test.*``) and its failure
        metrics per source (``iid.aurc``, ``corruption/digits-c.augrc_lo`` …; NaN ones left out)."""
        rows = self.table[(self.table.method != "model") & self.table.value.notna()]
        return [Child(f"error/{method}", {"errors": ctx.cfg.errors.model_dump_json()},
                      per_set_metrics(g))
                for method, g in rows.groupby("method", sort=False)]


class ErrorsStage(Stage):
    name = "errors"
    version = 5  # 5: risks of the incoming rows

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.errors.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("embed", "mutants")

    def key(self, ctx: Context, up: dict) -> dict:
        return {"features": sorted(up["embed"].features), "errors": ctx.cfg.errors.model_dump(), "id": ctx.cfg.data.id_dataset,
                "tau": up["mutants"].tau, "new_class": ctx.cfg.errors.new_class_sets(ctx.cfg.data.ood_groups),
                "incoming": ctx.cfg.data.incoming_datasets}

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
        failure = failure_detection(cfg, up["embed"].feature_dirs, df, part, all_risk, res, tau, tmp)
        metrics = pd.concat([metrics, failure], ignore_index=True)
        if cfg.data.incoming_datasets:
            all_risk = pd.concat([all_risk.astype({"wrong": "boolean"}),
                                  incoming_risks(up["embed"].feature_dirs, cfg.data.incoming_datasets, res, tau)], ignore_index=True)
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


def incoming_risks(feature_dirs: list[Path], datasets: list[str], res, tau: float) -> pd.DataFrame:
    """Risks of tonight's images (part ``incoming``): never fitted on; ``wrong`` known only where
    the image is labelled (a nullable boolean, NA elsewhere)."""
    rows, vec = read_error_rows(feature_dirs, datasets)
    labelled = rows.label.to_numpy() >= 0
    wrong = pd.array(np.where(labelled, rows.pred.to_numpy() != rows.label.to_numpy(), False), dtype="boolean")
    wrong[~labelled] = pd.NA
    return risk_frame(rows, vec, res, tau, "incoming", wrong)


def risk_frame(rows: pd.DataFrame, vec: dict[str, np.ndarray], res, tau: float, part: str, wrong) -> pd.DataFrame:
    """Risks of rows the error detectors were not fitted on (new classes, incoming images) from
    the fitted detectors ``res``: ``image_id, dataset, part, wrong, risk_*``."""
    out = pd.DataFrame({"image_id": rows.image_id, "dataset": rows.dataset, "part": part, "wrong": wrong})
    out["risk_conductance"] = res.conductance.risk(vec["conductance"])
    out["risk_lcr"] = rows.lcr.to_numpy(np.float32)
    out["risk_lcr_sprt"] = (np.asarray(SPRT(tau).lcr(vec["lcr_flips"] > 0.5)[0], np.float32) if "lcr_flips" in vec
                            else out["risk_lcr"])
    for kind, det in res.fusions.items():
        out[f"risk_fusion_{kind}"] = det.risk(np.column_stack([out.risk_lcr, out.risk_conductance]))
    return out


#: error detectors whose risk is a classifier's probability of a wrong prediction: 1 − risk is used
#: as a probability for the ECE as it is; the LCRs are rates and are Platt-scaled
PROBABILITY_RISKS = ("conductance", "fusion_")


def failure_detection(cfg: JobConfig, feature_dirs: list[Path], df: pd.DataFrame, part: np.ndarray, all_risk: pd.DataFrame,
                      res, tau: float, out: Path) -> pd.DataFrame:
    """The FD-Shifts failure table (metrics rows, task ``failure``) of every method on every failure
    source; writes ``failure.md``, ``failure_confidences.parquet`` (the evaluated rows' confidences),
    ``failure_calibration.json`` (fitted temperatures, Platt parameters) and
    ``failure_rc_<source>.png`` into ``out``.

    ``df``/``part``/``all_risk``: the ID and extra rows, their parts and risks (:meth:`ErrorsStage.run`);
    ``res``: the fitted error detectors, applied here to the new-class sets' rows too.
    """
    import json

    e, id_dataset = cfg.errors, cfg.data.id_dataset
    keep = np.isin(part, ("val", "test"))
    frame = all_risk[keep].reset_index(drop=True)
    frame["label"] = df.label.to_numpy()[keep]
    new_class = e.new_class_sets(cfg.data.ood_groups)
    nc_df, nc_vec = read_error_rows(feature_dirs, new_class) if new_class else (pd.DataFrame(), {})
    if len(nc_df):
        nc = risk_frame(nc_df, nc_vec, res, tau, "new-class", wrong=np.ones(len(nc_df), bool))
        nc["label"] = nc_df.label.to_numpy()
        frame = pd.concat([frame, nc[frame.columns]], ignore_index=True)
    logits = read_logits(feature_dirs, frame.image_id.to_numpy(), sorted(set(frame.dataset)))
    val = (frame.part == "val").to_numpy()
    correct = ~frame.wrong.to_numpy(bool)
    baselines = LogitConfidences.fit(logits[val], frame.label.to_numpy()[val])
    confidence = baselines(logits)
    for column in [c for c in frame.columns if c.startswith("risk_")]:
        confidence[column.removeprefix("risk_")] = 1.0 - frame[column].to_numpy(np.float64)
    probability, platt = {}, {}
    for m, conf in confidence.items():
        is_prob = m in PROBABILITY_LOGIT_METHODS or (m not in LOGIT_METHODS and m.startswith(PROBABILITY_RISKS))
        cal = calibrate(conf[val], correct[val], is_prob)
        probability[m] = conf if cal is None else cal(conf)
        if cal is not None:
            platt[m] = {"a": cal.a, "b": cal.b}

    is_test = (frame.part == "test").to_numpy()
    dataset = frame.dataset.to_numpy()
    id_test = is_test & (dataset == id_dataset)
    sources = [FailureSource("iid", "iid", np.flatnonzero(id_test), correct[id_test])]
    for extra in [x for x in e.extra_datasets if x != id_dataset]:
        m = is_test & (dataset == extra)
        sources.append(FailureSource(f"corruption/{extra}", "corruption", np.flatnonzero(m), correct[m]))
    for ood in new_class:
        rows = np.flatnonzero(id_test | (dataset == ood))
        is_ood = dataset[rows] == ood
        sources.append(FailureSource(f"new-class/{ood}", "new-class", rows, correct[rows], strata=is_ood,
                                     exclude=~is_ood & ~correct[rows]))
    empty = [s.name for s in sources if not s.kept().any()]
    if empty:
        print(f"[errors] failure sources without rows, skipped: {empty}", flush=True)
    sources = [s for s in sources if s.kept().any()]
    print(f"[errors] failure detection on {', '.join(f'{s.name} ({int(s.kept().sum())})' for s in sources)}; "
          f"{len(confidence)} methods, {e.n_bootstrap} bootstrap resamples", flush=True)
    table = failure_table(sources, confidence, probability, n_bootstrap=e.n_bootstrap, seed=e.seed)

    for s in sources:
        rows = s.rows[s.kept()]
        curves = {m: rc_curve(confidence[m][rows], correct[rows]) for m in confidence}
        plot_risk_coverage(curves, out / f"failure_rc_{s.name.replace('/', '_')}.png", dashed=tuple(m for m in confidence if m not in LOGIT_METHODS),
                           title=f"{cfg.experiment}: {s.name} (N = {len(rows)}, accuracy {100 * correct[rows].mean():.1f}%)",
                           accuracy=float(correct[rows].mean()))
    conf_frame = frame[["image_id", "dataset", "part"]].assign(correct=correct, **{f"conf_{m}": v.astype(np.float32) for m, v in confidence.items()})
    storage.write_table(pa.Table.from_pandas(conf_frame, preserve_index=False), out, "failure_confidences.parquet")
    (out / "failure_calibration.json").write_text(json.dumps({"logit_baselines": baselines.params(), "platt": platt}, indent=2))
    (out / "failure.md").write_text(failure_markdown(table) + "\n")
    return table


def read_logits(feature_dirs: list[Path], image_ids: np.ndarray, datasets: list[str]) -> np.ndarray:
    """The stored logits (N×C float32) of ``image_ids`` (rows of ``datasets``: only their files are
    read), in that order."""
    wanted = pc.field("dataset").isin(datasets) & pc.field("image_id").isin(pa.array(image_ids, pa.string()))
    table = storage.read_table(feature_dirs, ["image_id", "logits"], filter=wanted)
    pos = pd.Index(table.column("image_id").to_numpy(zero_copy_only=False)).get_indexer(image_ids)
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} rows have no logits in the features table")
    return storage.vector_to_numpy(table.column("logits"))[pos]


def read_error_rows(feature_dirs: list[Path], datasets: list[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The error-relevant columns of the features table for ``datasets``: (rows, {vector column: N×K})."""
    cols = ["image_id", "dataset", "split", "label", "pred", "conductance", "lcr", "lcr_mutants_used"]
    if "lcr_flips" in storage.committed_dataset(feature_dirs).schema.names:
        cols.append("lcr_flips")
    # only the files of ``datasets``; rows without the error columns (ID train beyond
    # errors.fit_fraction, jobs.rows) are not read
    table = storage.read_table(feature_dirs, cols, filter=pc.field("dataset").isin(datasets) & pc.field("lcr").is_valid())
    table = table.sort_by("image_id")  # one order whatever the shard layout: the detectors' training depends on it
    vectors = {c: storage.vector_to_numpy(table.column(c)) for c in ("conductance", "lcr_flips") if c in table.column_names}
    df = table.drop_columns(list(vectors)).to_pandas()
    df["dataset"] = df["dataset"].astype(str)
    return df, vectors
