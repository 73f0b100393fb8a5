"""SCORE: every detector as a column of the ``scores`` table, computed from stored features.

Cheap and CPU-only: a Ray Data map over the features table with the fitted detectors shipped
once through the object store. Columns: ``image_id, dataset, split, label, subset, pred`` and one
float32 ``score_<key>`` per configured detector. Sharded like EMBED: a shard is keyed by the FIT
key and its EMBED shard, so new images score only their shards (``score/shards/key=…``); the
stage directory (``score/key=…/index.json``) lists them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs import shards, storage
from jobs.config import JobConfig
from jobs.runtime import init_ray
from jobs.shards import commit_shard
from jobs.stages.base import Context, Stage, StageResult
from jobs.storage import StageDir, parquet_rows, vector_to_numpy
from oodlib.detectors import Detector, ScoreInputs

SHARD_VERSION = 2
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
        cols[f"score_{key}"] = pa.array(det.score(inputs))
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


@dataclass
class ScoreResult(StageResult):
    dirs: list[Path]  # the ``scores`` directory of every shard

    def read(self, columns: list[str] | None = None):
        """The whole scores table as a DataFrame (``dataset`` as str)."""
        df = storage.read_table(self.dirs, columns).to_pandas()
        if "dataset" in df:
            df["dataset"] = df["dataset"].astype(str)
        return df


class ScoreStage(Stage):
    name = "score"
    version = 2

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("embed", "fit")

    def key(self, ctx: Context, up: dict) -> dict:
        features = up["embed"].features
        self._keys = {e: storage.content_key("score-shard", SHARD_VERSION, fit=up["fit"].path.name, embed=e) for e in features}
        return {"shards": sorted(self._keys.values())}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        features = up["embed"].features
        targets = {e: StageDir(ctx.root / self.name / "shards", k) for e, k in self._keys.items()}
        todo = {e: t for e, t in targets.items() if not t.done}
        print(f"[score] recomputing {len(todo)} of {len(targets)} shards", flush=True)
        if todo:
            init_ray()
            with_rows = {e: features[e] for e in todo if parquet_rows(features[e])}
            if with_rows:
                run_score(with_rows, {e: todo[e] for e in with_rows}, up["fit"].detectors, ctx.scratch / "score")
            for e in set(todo) - set(with_rows):  # every image of the shard was quarantined
                commit_shard(todo[e], {"scores": None}, {"rows": 0})
        shards.write_index(tmp, [targets[e].path for e in sorted(targets)], {})

    def load(self, ctx: Context, up: dict, path: Path) -> ScoreResult:
        return ScoreResult(path, [Path(p) / "scores" for p in json.loads((path / "index.json").read_text())["shards"]])
