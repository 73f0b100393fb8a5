"""MUTANTS (before EMBED) and ERRORS (after it): wrong-prediction risk.

MUTANTS rejection-samples the accepted mutants on the ID validation split (a mutant is its
(operator, rate, seed) row, never weights) and fits the SPRT threshold τ on the LCR of correct
predictions of the validation part (ID val and the val part of the labelled extra sets). EMBED then computes ``conductance``, ``lcr`` and ``lcr_mutants_used``
per image in the same pass. ERRORS fits the conductance error detector and the fusions, and
writes the ``risks`` table, the seed paper's tables (4–6 and 3) and the AUROC-vs-mutants figure.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from jobs import storage
from jobs.config import ConfigError, JobConfig
from oodlib.data.decode import decode_batch
from oodlib.error_detection import (
    auroc_vs_mutants, error_table, fit_and_evaluate, group_split, lcr_table, plot_auroc_vs_mutants, to_long_metrics,
)
from oodlib.lcr import SPRT, fit_sprt_tau, label_change_rate
from oodlib.models import ModelAdapter
from oodlib.mutants import generate_mutants, predict

STAGE_VERSION = 1
SPLITS = ("fit", "val", "test")


def mutants_stage(cfg: JobConfig, selected: pa.Table, model: ModelAdapter, model_hash: str, rows_hash) -> tuple[dict, Path]:
    """Accepted mutants and τ (committed as ``mutants/key=…/mutants.parquet`` + ``sprt.json``).

    Mutants are accepted on the ID validation split; τ is fitted on the correct predictions of
    the whole validation part — the ID val split plus the val part of every labelled extra set
    (:func:`assign_parts`), the rows every other error threshold is fitted on.
    Returns ({"table": columns dict, "tau": τ}, path) — what the EMBED actors need."""
    e = cfg.errors
    val = _validation_part(cfg, selected)
    is_id = np.asarray(val.column("dataset").to_pylist()) == cfg.data.id_dataset
    if not is_id.any():
        raise ValueError(f"errors: mutants are accepted on the validation split of {cfg.data.id_dataset!r}, which has no rows")
    key = storage.content_key("mutants", STAGE_VERSION, model=model_hash, val=rows_hash(val), mutants=e.mutants.model_dump(), sprt=e.sprt.model_dump())
    target = storage.stage_dir(cfg.output, cfg.experiment, "mutants", key)
    if not target.done:
        x, reasons = decode_batch(val.column("image").to_pylist(), val.column("path").to_pylist(), model.preprocess)
        ok = np.array([r is None for r in reasons])
        y, is_id = np.asarray(val.column("label").to_pylist())[ok], is_id[ok]
        m = e.mutants
        try:
            mutants = generate_mutants(model, x[is_id], y[is_id], m.operator, m.rate, m.n_accepted, m.max_tries)
        except RuntimeError as exc:  # the rejection-sampling cap: a config problem, not a crash
            raise ConfigError(f"errors.mutants: {exc}") from None
        preds = predict(model, x)
        res = label_change_rate(model, x, mutants.patches(model), preds=preds, batch_size=1024)
        correct = preds.numpy() == y
        tau = fit_sprt_tau(res.lcr[correct], mutants.n_accepted, e.sprt.confidence, e.sprt.band)
        with target.writing() as tmp:
            storage.write_table(pa.Table.from_pandas(mutants.to_frame(), preserve_index=False), tmp, "mutants.parquet")
            (tmp / "sprt.json").write_text(json.dumps({
                "tau": tau, "accepted": mutants.n_accepted, "rejected": mutants.n_rejected,
                "original_val_acc": float(np.mean(correct[is_id])), "tau_rows": int(correct.sum()),
            }))
    table = pd.read_parquet(target.path / "mutants.parquet")
    sprt = json.loads((target.path / "sprt.json").read_text())
    print(f"[mutants] {sprt['accepted']} accepted, {sprt['rejected']} rejected ({cfg.errors.mutants.operator} "
          f"{cfg.errors.mutants.rate}); SPRT τ = {sprt['tau']:.4f} from {sprt['tau_rows']} correct validation "
          f"predictions", flush=True)
    return {"table": table.to_dict("list"), "tau": sprt["tau"]}, target.path


def _validation_part(cfg: JobConfig, selected: pa.Table) -> pa.Table:
    """The rows of ``selected`` in the ``val`` part: ID val plus the val groups of the extra sets."""
    sets = selected.filter(pc.field("dataset").isin([cfg.data.id_dataset, *cfg.errors.extra_datasets]))
    ids = sets.select(["image_id", "dataset", "split"]).to_pandas()
    ids["dataset"] = ids["dataset"].astype(str)
    return sets.filter(pa.array(assign_parts(ids, cfg.data.id_dataset, cfg.errors.seed) == "val"))


def _read_error_rows(feature_dirs: list[Path], datasets: list[str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    cols = ["image_id", "dataset", "split", "label", "pred", "conductance", "lcr", "lcr_mutants_used"]
    first = next(p for d in feature_dirs for p in Path(d).rglob("*.parquet"))
    if "lcr_flips" in pq.read_schema(first).names:
        cols.append("lcr_flips")
    table = storage.read_table(feature_dirs, cols, filter=pc.field("dataset").isin(datasets))
    vectors = {c: storage.vector_to_numpy(table.column(c)) for c in ("conductance", "lcr_flips") if c in table.column_names}
    df = table.drop_columns(list(vectors)).to_pandas()
    df["dataset"] = df["dataset"].astype(str)
    return df, vectors


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


def run_errors(cfg: JobConfig, feature_dirs: list[Path], tau: float, target: storage.StageDir) -> pd.DataFrame:
    """Fit and evaluate every wrong-prediction detector; commit risks, tables and the figure.
    Returns the metrics rows (task ``error``, dataset ``val``/``test``)."""
    e = cfg.errors
    df, vec = _read_error_rows(feature_dirs, [cfg.data.id_dataset, *e.extra_datasets])
    part = assign_parts(df, cfg.data.id_dataset, e.seed)
    wrong = (df.pred != df.label).to_numpy()
    lcr = df.lcr.to_numpy()
    by = {s: part == s for s in SPLITS}
    res = fit_and_evaluate(
        {s: vec["conductance"][by[s]] for s in SPLITS}, {s: lcr[by[s]] for s in SPLITS}, {s: wrong[by[s]] for s in SPLITS},
        seed=e.seed, epochs=e.detector_epochs,
    )
    risks = res.risks
    if "lcr_flips" in vec:  # post-hoc SPRT on the full flip matrix
        decision, used = SPRT(tau).decide(vec["lcr_flips"] > 0.5)
        counted = np.arange(vec["lcr_flips"].shape[1])[None, :] < used[:, None]
        lcr_sprt = ((vec["lcr_flips"] > 0.5) & counted).sum(1) / used
        df["lcr_sprt_mutants_used"] = used
        risks["lcr_sprt"] = {s: lcr_sprt[by[s]].astype(np.float32) for s in ("val", "test")}
    else:  # EMBED already stopped early: lcr is the SPRT estimate
        lcr_sprt = lcr
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
    used_mean = float(np.mean(df.get("lcr_sprt_mutants_used", df.lcr_mutants_used)))
    metrics = pd.concat([metrics, pd.DataFrame([{"task": "error", "method": "lcr_sprt", "dataset": "all", "metric": "mutants_used_mean", "value": used_mean}])], ignore_index=True)
    with target.writing({"tau": tau}) as tmp:
        storage.write_table(pa.Table.from_pandas(all_risk, preserve_index=False), tmp, "risks.parquet")
        storage.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp, "error_table.parquet")
        storage.write_table(pa.Table.from_pandas(lcr_t3, preserve_index=False), tmp, "lcr_table.parquet")
        storage.write_table(pa.Table.from_pandas(metrics, preserve_index=False), tmp, "metrics.parquet")
        (tmp / "error_table.md").write_text(error_markdown(table, lcr_t3, used_mean, vec.get("lcr_flips")))
        np.savez(tmp / "conductance_detector.npz", **res.conductance.state_dict())
        for kind, det in res.fusions.items():
            np.savez(tmp / f"fusion_{kind}.npz", **det.state_dict())
        if "lcr_flips" in vec:
            test = by["test"]
            curve = auroc_vs_mutants(vec["lcr_flips"][test] > 0.5, wrong[test])
            storage.write_table(pa.Table.from_pandas(curve, preserve_index=False), tmp, "auroc_vs_mutants.parquet")
            plot_auroc_vs_mutants({f"{m.operator} {m.rate}": curve}, tmp / "auroc_vs_mutants.png")
    return metrics


def error_markdown(table: pd.DataFrame, lcr_t3: pd.DataFrame, used_mean: float, flips) -> str:
    cols = ["val_auroc", "val_recall_correct", "val_recall_wrong", "test_auroc", "test_recall_correct", "test_recall_wrong"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['method']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for _, r in table.iterrows()]
    r = lcr_t3.iloc[0]
    lines += ["", f"LCR ({r.operator} {r.rate}): correct {r.correct_mean:.3f} ± {r.correct_std:.3f}, "
              f"wrong {r.wrong_mean:.3f} ± {r.wrong_std:.3f}",
              f"SPRT: {used_mean:.1f} mutants per input on average" + (f" of {flips.shape[1]}" if flips is not None else "")]
    return "\n".join(lines)
