"""SCORE: every detector as a column of the ``scores`` table, computed from stored features.

Cheap and CPU-only: a Ray Data map over the features table with the fitted detectors shipped
once through the object store. Columns: ``image_id, dataset, split, label, subset, pred`` and one
float32 ``score_<key>`` per configured detector.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.shards import commit_shard
from jobs.storage import StageDir, parquet_rows, vector_to_numpy
from oodlib.detectors import Detector, ScoreInputs

STAGE_VERSION = 1
ID_COLUMNS = ("image_id", "dataset", "split", "label", "subset", "pred")


def score_batch(batch: pa.Table, detectors: dict[str, Detector]) -> pa.Table:
    """Score one features batch with every detector; one ``score_<key>`` column each."""
    needed = {c for det in detectors.values() for c in det.requires} - {"features", "logits"}
    inputs = ScoreInputs(
        features=vector_to_numpy(batch.column("features")),
        logits=vector_to_numpy(batch.column("logits")),
        extras={c: _column_numpy(batch.column(c)) for c in needed},
    )
    cols = {c: batch.column(c) for c in ID_COLUMNS}
    for key, det in detectors.items():
        s = np.asarray(det.score(inputs), np.float32)
        if s.shape != (batch.num_rows,):
            raise RuntimeError(f"detector {key!r} returned shape {s.shape} for {batch.num_rows} rows")
        cols[f"score_{key}"] = pa.array(s)
    return pa.table(cols)


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type):
        return vector_to_numpy(column)
    return column.to_numpy()


def source_shard(paths: pa.ChunkedArray) -> pa.Array:
    """The embed shard key of each row, from its file path (``…/key=<shard key>/features/…``)."""
    return pa.array([p.split("/key=", 1)[1].split("/", 1)[0] for p in paths.to_pylist()], pa.string())


class ScoreMapper:
    """Ray Data callable class holding the fitted detectors (fetched once per actor)."""

    def __init__(self, detectors_ref) -> None:
        import ray

        self.detectors = ray.get(detectors_ref)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scored = score_batch(batch, self.detectors)
        return scored.append_column("source_shard", source_shard(batch.column("path")))


def run_score(
    features: dict[str, Path], targets: dict[str, StageDir], detectors: dict[str, Detector], scratch: Path,
    batch_size: int = 4096,
) -> dict[str, int]:
    """Score the feature shards ``features`` ({embed shard key: features dir}) and commit each
    shard's ``scores/`` (partitioned by dataset) to ``targets[embed shard key]``. Returns rows per shard."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.read_parquet([str(p) for p in features.values()], include_paths=True)
    out = ds.map_batches(
        ScoreMapper,
        fn_constructor_kwargs={"detectors_ref": ray.put(detectors)},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=1,
    )
    out.write_parquet(str(scratch / "scores"), partition_cols=["source_shard", "dataset"])
    rows = {}
    for key, target in targets.items():
        part = scratch / "scores" / f"source_shard={key}"
        rows[key] = parquet_rows(part)
        expected = parquet_rows(features[key])
        if rows[key] != expected:
            raise RuntimeError(f"SCORE shard {key}: {rows[key]} rows scored for {expected} feature rows")
        commit_shard(target, {"scores": part}, {"rows": rows[key]})
    return rows
