"""GAUSSIANIZE and GRAPH: long-tailed OOD detection with graph embeddings.

GAUSSIANIZE (before EMBED) re-estimates the backbone's BatchNorm statistics on the long-tailed ID
training images; EMBED then writes ``gfeatures`` next to ``features`` in its single pass.
GRAPH trains each configured variant (Pre-train, +Gau., +GCN, +Gau.+GCN, +Gau.+MLP) on the
train-ID ∪ OE ∪ val nodes and scores an inductive graph per OOD set (test-ID ∪ that set), so the
ID test rows get one score per OOD set: the ``graph_scores`` table is keyed by
(``image_id``, ``ood_set``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from jobs import storage
from jobs.config import JobConfig
from oodlib.data.decode import decode_batch
from oodlib.graph import gaussianize, load_bn_state, neighbour_stats, save_bn_state
from oodlib.graph.ltood import make_ablation
from oodlib.metrics import OOD_METRICS, head_tail_accuracy, ood_metrics
from oodlib.models import ModelAdapter

STAGE_VERSION = 1
COLUMNS = ["image_id", "dataset", "split", "label", "features", "gfeatures"]


def lt_train_rows(selected: pa.Table, dataset: str) -> pa.Table:
    """The train rows of the long-tailed ID set."""
    mask = pc.and_(pc.equal(selected.column("dataset"), dataset), pc.equal(selected.column("split"), "train"))
    rows = selected.filter(mask)
    if rows.num_rows == 0:
        raise ValueError(f"graph.train_dataset: no train rows of {dataset!r} in the manifest")
    return rows


def gaussianized_model(cfg: JobConfig, rows: pa.Table, model: ModelAdapter, model_hash: str, rows_hash: str) -> tuple[ModelAdapter, Path]:
    """The model with BN statistics re-estimated on the LT train ``rows`` (decoded here, once),
    committed as ``gaussianized/key=…/bn.safetensors``."""
    key = storage.content_key(
        "gaussianize", STAGE_VERSION, model=model_hash, train=rows_hash, epochs=cfg.graph.bn_finetune_epochs, seed=cfg.graph.seed
    )
    target = storage.stage_dir(cfg.output, cfg.experiment, "gaussianized", key)
    if not target.done:
        x, reasons = decode_batch(rows.column("image").to_pylist(), rows.column("path").to_pylist(), model.preprocess)
        labels = np.asarray(rows.column("label").to_pylist())[[r is None for r in reasons]]
        data = x if cfg.graph.bn_finetune_epochs == 0 else [(x, labels)]
        g = gaussianize(model, data, epochs=cfg.graph.bn_finetune_epochs, seed=cfg.graph.seed, device="cpu")
        with target.writing({"images": int(len(x))}) as tmp:
            save_bn_state(g, tmp / "bn.safetensors")
    import copy

    g = load_bn_state(copy.deepcopy(model), target.path / "bn.safetensors")
    return g.eval(), target.path


def _read_graph_rows(feature_dirs: list[Path], datasets: list[str]) -> pd.DataFrame:
    table = storage.read_table(feature_dirs, COLUMNS, filter=pc.field("dataset").isin(datasets))
    df = table.drop_columns(["features", "gfeatures"]).to_pandas()
    df["dataset"] = df["dataset"].astype(str)
    df.attrs["features"] = storage.vector_to_numpy(table.column("features"))
    df.attrs["gfeatures"] = storage.vector_to_numpy(table.column("gfeatures"))
    return df


def run_graph(cfg: JobConfig, feature_dirs: list[Path], num_classes: int, target: storage.StageDir) -> pd.DataFrame:
    """Fit every ablation, score every OOD set, commit ``graph_scores``, ``metrics`` and the
    neighbour table to ``target``; returns the metrics rows (task ``ood-lt``)."""
    g = cfg.graph
    ood_sets = g.ood_datasets or cfg.data.ood_datasets
    df = _read_graph_rows(feature_dirs, [g.train_dataset, g.oe_dataset, cfg.data.id_dataset, *ood_sets])
    is_train = ((df.dataset == g.train_dataset) & (df.split == "train")).to_numpy()
    is_oe = (df.dataset == g.oe_dataset).to_numpy()
    is_val = ((df.dataset == cfg.data.id_dataset) & (df.split == "val")).to_numpy()
    is_test = ((df.dataset == cfg.data.id_dataset) & (df.split == "test")).to_numpy()
    nodes = np.flatnonzero(is_train | is_oe | is_val)
    role = np.where(is_train[nodes], "train", np.where(is_oe[nodes], "oe", "val"))
    labels = np.where(is_oe[nodes], -1, df.label.to_numpy()[nodes])
    counts = np.bincount(df.label.to_numpy()[is_train], minlength=num_classes)
    test_idx = np.flatnonzero(is_test)
    y_test = df.label.to_numpy()[test_idx]

    metrics, score_parts, embeddings = [], [], []
    with target.writing() as tmp:
        for name in g.ablations:
            column, est = make_ablation(name, k=g.k, hidden=g.hidden, epochs=g.epochs, seed=g.seed, num_classes=num_classes)
            X = df.attrs[column]
            est.fit(X[nodes], labels, role)
            est.save(tmp / f"{name}.safetensors")
            if name == "gcn":
                stats = neighbour_stats(est.edge_index_, labels, counts)
                stats.insert(0, "image_id", df.image_id.to_numpy()[nodes][stats.node.to_numpy()])
                storage.write_table(pa.Table.from_pandas(stats, preserve_index=False), tmp, "neighbours.parquet")
            per_set = {}
            for ood in ood_sets:
                ood_idx = np.flatnonzero((df.dataset == ood).to_numpy())
                rows = np.r_[test_idx, ood_idx]
                out = est.predict(X[rows], batch_size=g.batch_size, seed=g.seed)
                per_set[ood] = ood_metrics(out["score"][: len(test_idx)], out["score"][len(test_idx) :])
                acc = head_tail_accuracy(y_test, out["pred"][: len(test_idx)], counts)
                metrics += [dict(task="ood-lt", method=name, dataset=ood, metric=k, value=v) for k, v in {**per_set[ood], **acc}.items()]
                part = pd.DataFrame({"image_id": df.image_id.to_numpy()[rows], "ood_set": ood, "method": name,
                                     "score": out["score"], "pred": out["pred"]})
                score_parts.append(part)
                if name == "gcn":
                    embeddings.append(pa.table({"image_id": part.image_id, "ood_set": part.ood_set, "embedding": storage.vector_column(out["embedding"])}))
            metrics += [dict(task="ood-lt", method=name, dataset="avg", metric=k, value=float(np.mean([m[k] for m in per_set.values()])))
                        for k in OOD_METRICS]
        scores = pd.concat(score_parts, ignore_index=True)
        storage.write_table(pa.Table.from_pandas(scores, preserve_index=False), tmp, "graph_scores.parquet")
        if embeddings:
            storage.write_table(pa.concat_tables(embeddings), tmp, "embeddings.parquet")
        metrics_df = pd.DataFrame(metrics)
        storage.write_table(pa.Table.from_pandas(metrics_df, preserve_index=False), tmp, "metrics.parquet")
    return metrics_df
