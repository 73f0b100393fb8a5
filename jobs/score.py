"""SCORE: every detector as a column of the ``scores`` table, computed from stored features.

Cheap and CPU-only: a Ray Data map over the features table with the fitted detectors shipped
once through the object store. Columns: ``image_id, dataset, split, label, subset, pred`` and one
float32 ``score_<key>`` per configured detector.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.storage import StageDir, vector_to_numpy
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


class ScoreMapper:
    """Ray Data callable class holding the fitted detectors (fetched once per actor)."""

    def __init__(self, detectors_ref) -> None:
        import ray

        self.detectors = ray.get(detectors_ref)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_batch(batch, self.detectors)


def run_score(features_dir: Path, detectors: dict[str, Detector], target: StageDir, batch_size: int = 4096) -> dict:
    """Score every feature row and commit the ``scores`` table (partitioned by dataset)."""
    import ray
    from ray.data import ActorPoolStrategy

    started = time.time()
    ds = ray.data.read_parquet(str(features_dir))
    n_in = ds.count()
    out = ds.map_batches(
        ScoreMapper,
        fn_constructor_kwargs={"detectors_ref": ray.put(detectors)},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=1,
    ).materialize()
    with target.writing() as tmp:
        out.write_parquet(str(tmp / "scores"), partition_cols=["dataset"])
        n_out = out.count()
        if n_out != n_in:
            raise RuntimeError(f"SCORE wrote {n_out} rows for {n_in} feature rows")
    return {"rows": n_out, "seconds": round(time.time() - started, 2)}
