"""SCORE: every detector as a column of the ``scores`` table, computed from stored features.

Rows: those the scores are used on (:func:`jobs.rows.scored_rows`: the ID val and test splits, the
OOD, extra and incoming sets). The ID train split — the detectors' own fitting data, 93% of an
ImageNet job's rows — and the graph's sets are not scored: nothing downstream reads their scores.

Cheap and CPU-only: a pool of actors (one per CPU, the fitted detectors rebuilt once per actor
from their arrays in the object store), each reading, scoring and writing whole shards. Columns: ``image_id, dataset, split, label, subset, pred`` and one
float32 ``score_<key>`` per configured detector. Sharded like EMBED: a shard is keyed by the FIT
key and its EMBED shard, so new images score only their shards (``tables/scores/shard-…``, inside the
published ``scores`` Delta table); the
stage directory (``score/key=…/index.json``) lists them.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import shards, storage, store
from jobs.config import JobConfig
from jobs.rows import scored_rows
from jobs.runtime import init_ray
from jobs.shards import commit_shard
from jobs.stages.base import Context, ShardFiles, Stage, StageResult
from jobs.storage import StageDir, column_numpy, parquet_rows, vector_to_numpy
from jobs.workers import actor_map, cluster_cpus, fetch
from oodlib.detectors import Detector, ScoreInputs

SHARD_VERSION = 4
ID_COLUMNS = ("image_id", "dataset", "split", "label", "subset", "batch", "pred")


def score_batch(batch: pa.Table, detectors: dict[str, Detector]) -> pa.Table:
    """Score one features batch with every detector; one ``score_<key>`` column each — null on the
    rows where an EMBED column the detector reads is missing (not computed there, :mod:`jobs.rows`)."""
    needed = {c for det in detectors.values() for c in det.requires} - {"features", "logits"}
    inputs = ScoreInputs(
        features=vector_to_numpy(batch.column("features")),
        logits=vector_to_numpy(batch.column("logits")),
        extras={c: column_numpy(batch.column(c)) for c in needed},
    )
    cols = {c: batch.column(c) for c in ID_COLUMNS}
    # a row whose EMBED column a detector reads was not computed there (jobs.rows) gets a null score
    missing = {c: np.isnan(v.reshape(len(v), -1)).all(1) for c, v in inputs.extras.items()}
    for key, det in detectors.items():
        absent = np.zeros(batch.num_rows, bool)
        for c in det.requires:
            absent |= missing.get(c, absent)
        if not absent.any():
            cols[f"score_{key}"] = pa.array(det.score(inputs))
            continue
        scores = np.full(batch.num_rows, np.nan, np.float32)
        have = np.flatnonzero(~absent)
        if len(have):
            scores[have] = det.score(ScoreInputs(inputs.features[have], inputs.logits[have],
                                                 {c: v[have] for c, v in inputs.extras.items()}))
        cols[f"score_{key}"] = pa.array(scores, mask=absent)
    return pa.table(cols)


def detector_specs(detectors: dict[str, Detector]) -> dict[str, tuple[str, dict, dict]]:
    """{column: (registry name, hyperparameters, fitted arrays)}: what a worker rebuilds the fitted
    detectors from (arrays travel zero-copy through the object store; derived caches such as a
    faiss index are rebuilt once per worker)."""
    return {key: (det.name, det.params(), det.state_dict()) for key, det in detectors.items()}


class ScoreWorker:
    """A Ray actor holding the fitted detectors; it reads, scores and writes whole shards itself,
    so SCORE needs no read tasks besides it (one free CPU is enough)."""

    def __init__(self, specs_ref) -> None:
        from oodlib.detectors import DETECTORS

        specs = fetch(specs_ref)
        # writable copies: arrays from the object store are read-only, and torch wants writable memory
        self.detectors = {k: DETECTORS[name](**params).load_state_dict({a: np.array(v) for a, v in state.items()})
                          for k, (name, params, state) in specs.items()}

    def score_shard(self, features_dir: str, out_dir: str, rows: dict, batch_size: int = 4096) -> int:
        """Score the ``rows`` ({dataset: splits or None}) of one shard's features into ``out_dir``
        (partitioned by dataset); returns the rows scored. Rerunnable: an earlier attempt's files
        (its actor lost mid-write) are cleared first."""
        shutil.rmtree(out_dir, ignore_errors=True)
        if storage.committed_rows(Path(features_dir)) == 0:  # every image of the shard was quarantined
            return 0
        table = storage.read_table(Path(features_dir), filter=storage.rows_filter(rows))
        parts = [score_batch(table.slice(i, batch_size), self.detectors) for i in range(0, table.num_rows, batch_size)]
        scored = pa.concat_tables(parts) if parts else None
        if scored is not None:
            pq.write_to_dataset(scored, out_dir, partition_cols=["dataset"], basename_template="part-{i}.parquet")
            written = Path(out_dir)
            store.upload(written, [p.relative_to(written).as_posix() for p in written.rglob("*.parquet")])  # to the driver
        return table.num_rows


def run_score(ctx: Context, features: dict[str, Path], targets: dict[str, StageDir], detectors: dict[str, Detector],
              wanted: dict[str, tuple[str, ...] | None]) -> None:
    """Score the rows ``wanted`` ({dataset: splits or None}; the job's are
    :func:`~jobs.rows.scored_rows`) of the feature shards ``features`` ({embed shard key: features
    dir}) with a pool of :class:`ScoreWorker` actors (:func:`~jobs.workers.actor_map`: a shard whose
    actor is lost runs again on another) and commit each shard's ``scores/`` to
    ``targets[key]``, in shard order. A shard whose scored rows differ from the matching feature
    rows is not committed."""
    import ray

    keys = sorted(features)
    specs = ray.put(detector_specs(detectors))
    out = {k: ctx.scratch / "score" / k for k in keys}
    make_worker = lambda: ray.remote(num_cpus=1)(ScoreWorker).remote(specs)  # noqa: E731
    score = lambda worker, k: worker.score_shard.remote(str(features[k]), str(out[k]), wanted)  # noqa: E731
    for key, rows in zip(keys, actor_map(make_worker, score, keys, min(len(keys), cluster_cpus()),
                                         ctx.cfg.runtime.stall_timeout_s, "SCORE (one shard per unit)")):
        expected = (storage.read_table(features[key], ["split"], storage.rows_filter(wanted)).num_rows
                    if storage.committed_rows(features[key]) else 0)
        store.pull(out[key])
        if rows != expected or parquet_rows(out[key]) != expected:
            raise RuntimeError(f"SCORE shard {key}: {parquet_rows(out[key])} rows scored for {expected} feature rows")
        commit_shard(targets[key], {"scores": out[key]}, {"rows": rows})

@dataclass
class ScoreResult(StageResult):
    dirs: list[Path]  # the ``scores`` directory of every shard

    def tables(self) -> dict:
        return {"scores": ShardFiles([d.parent for d in self.dirs], "scores")}

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
        self._keys = {e: storage.content_key("score-shard", SHARD_VERSION, fit=up["fit"].path.name, embed=e,
                                              rows=scored_rows(ctx.cfg).key()) for e in features}
        return {"shards": sorted(self._keys.values())}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        features = up["embed"].features
        targets = {e: self._shard_dir(ctx, k) for e, k in self._keys.items()}
        todo = {e: t for e, t in targets.items() if not t.committed()}
        ctx.progress(f"recomputing {len(todo)} of {len(targets)} shards")
        if todo:
            init_ray()
            run_score(ctx, {e: features[e] for e in todo}, todo, up["fit"].detectors, scored_rows(ctx.cfg).splits())
        shards.write_index(tmp, [targets[e].path for e in sorted(targets)], ctx.root, {})

    def intact(self, ctx: Context, up: dict, path: Path) -> bool:
        return all(self._shard_dir(ctx, k).committed() for k in self._keys.values())

    @staticmethod
    def _shard_dir(ctx: Context, key: str) -> StageDir:
        return StageDir(ctx.root / "tables" / "scores", key, "shard-")

    def load(self, ctx: Context, up: dict, path: Path) -> ScoreResult:
        return ScoreResult(path, shards.index_dirs(path, "scores"))
