"""GRAPH: long-tailed OOD detection with graph embeddings, on EMBED's ``features``/``gfeatures``.

Trains each configured variant (Pre-train, +Gau., +GCN, +Gau.+GCN, +Gau.+MLP) on the
train-ID ∪ OE ∪ val nodes and scores an inductive graph per OOD set (test-ID ∪ that set), so the
ID test rows get one score per OOD set: the ``graph_scores`` table is keyed by
(``image_id``, ``ood_set``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import JobConfig
from jobs.stages.base import Child, Context, Stage, StageResult, per_set_metrics
from oodlib.metrics import OOD_METRICS, head_tail_accuracy, ood_metrics

COLUMNS = ["image_id", "dataset", "split", "label", "features", "gfeatures"]


@dataclass
class GraphResult(StageResult):
    table: pd.DataFrame

    def metrics(self) -> pd.DataFrame:
        return self.table

    def tables(self) -> dict:
        return {"graph_scores": pq.read_table(self.path / "graph_scores.parquet")}

    def children(self, ctx: Context) -> list[Child]:
        params = ctx.cfg.graph.model_dump(exclude={"ablations", "enabled"})
        return [Child(f"lt/{method}", {"variant": method, **params}, per_set_metrics(g))
                for method, g in self.table.groupby("method", sort=False)]


class GraphStage(Stage):
    name = "graph"
    version = 3

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.graph.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("embed",)

    def key(self, ctx: Context, up: dict) -> dict:
        cfg = ctx.cfg
        return {"features": sorted(up["embed"].features), "graph": cfg.graph.model_dump(), "id": cfg.data.id_dataset,
                "ood": cfg.graph.ood_datasets or cfg.data.ood_datasets}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        run_graph(ctx.cfg, up["embed"].feature_dirs, ctx.model.num_classes, tmp)

    def load(self, ctx: Context, up: dict, path: Path) -> GraphResult:
        return GraphResult(path, pq.read_table(path / "metrics.parquet").to_pandas())


def read_graph_rows(feature_dirs: list[Path], parts: dict[str, tuple[str, ...] | None]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """(rows, {"features": N×D, "gfeatures": N×D}) of ``parts`` ({dataset: its splits, None = all})."""
    table = storage.read_table(feature_dirs, COLUMNS, filter=storage.rows_filter(parts))
    table = table.sort_by("image_id")  # one order whatever the shard layout: the graph and its training depend on it
    df = table.drop_columns(["features", "gfeatures"]).to_pandas()
    df["dataset"] = df["dataset"].astype(str)
    return df, {c: storage.vector_to_numpy(table.column(c)) for c in ("features", "gfeatures")}


def graph_parts(cfg: JobConfig) -> dict[str, tuple[str, ...] | None]:
    """The rows GRAPH uses: its train split, the OE set, ID val and test, the OOD sets (every split)."""
    g, id_dataset = cfg.graph, cfg.data.id_dataset
    parts: dict[str, set[str] | None] = {d: None for d in [g.oe_dataset, *(g.ood_datasets or cfg.data.ood_datasets)]}
    for d, split in ((g.train_dataset, "train"), (id_dataset, "val"), (id_dataset, "test")):
        if d not in parts or parts[d] is not None:
            parts[d] = (parts.get(d) or set()) | {split}
    return {d: None if s is None else tuple(sorted(s)) for d, s in parts.items()}


def run_graph(cfg: JobConfig, feature_dirs: list[Path], num_classes: int, tmp: Path) -> None:
    """Fit every ablation, score every OOD set, write ``graph_scores``, ``metrics``, the neighbour
    table and each fitted estimator to ``tmp``."""
    g = cfg.graph
    ood_sets = g.ood_datasets or cfg.data.ood_datasets
    df, X_by = read_graph_rows(feature_dirs, graph_parts(cfg))
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

    from oodlib.longtail import make_ablation, neighbour_stats  # torch-geometric: 1.5 s of import, only when used

    metrics, score_parts, embeddings = [], [], []
    for name in g.ablations:
        print(f"[graph] training {name} on {len(nodes)} nodes ({g.epochs} epochs)", flush=True)
        column, est = make_ablation(name, k=g.k, hidden=g.hidden, epochs=g.epochs, seed=g.seed, num_classes=num_classes)
        X = X_by[column]
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
    storage.write_table(pa.Table.from_pandas(pd.concat(score_parts, ignore_index=True), preserve_index=False), tmp, "graph_scores.parquet")
    if embeddings:
        storage.write_table(pa.concat_tables(embeddings), tmp, "embeddings.parquet")
    storage.write_table(pa.Table.from_pandas(pd.DataFrame(metrics), preserve_index=False), tmp, "metrics.parquet")
