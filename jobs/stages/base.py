"""What a stage is: its name (= its output directory), version, the upstream results it needs,
its content key, ``run`` and ``load``. The one loop that drives stages is :mod:`jobs.pipeline`.

A stage never reads another stage's files through paths it finds itself: the loop hands it the
typed results of the stages it declares in :meth:`Stage.needs` (``up["embed"].features`` …).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from jobs import store
from jobs.config import DetectorConfig, JobConfig
from jobs.shards import row_identities
from jobs.storage import StageDir, content_key
from oodlib.detectors import Detector, Head
from oodlib.models import ModelAdapter


@dataclass
class Context:
    """Everything a stage may read besides its upstream results. ``detectors`` are the detector
    entries FIT, SCORE and EVALUATE use (a sweep's grid; else the config's)."""

    cfg: JobConfig
    model: ModelAdapter
    model_hash: str
    head: Head
    scratch: Path
    detectors: list[DetectorConfig]
    #: report progress of the running stage (the loop points it at the stage's heartbeat)
    progress: Callable[[str], None] = print

    @property
    def root(self) -> Path:
        """``{output}/{experiment}`` (its local path, :mod:`jobs.store`): where every stage directory lives."""
        return store.root_path(self.cfg.output) / self.cfg.experiment

    def build_detectors(self) -> dict[str, Detector]:
        """The configured detectors, keyed by score column (``score_<key>``)."""
        from jobs.config import ConfigError
        from oodlib.detectors import make_detector

        out = {}
        for d in self.detectors:
            try:
                out[d.key] = make_detector(d.name, **d.params)
            except TypeError as exc:
                raise ConfigError(f"detectors[{d.key}].params: {exc}") from None
        return out


@dataclass
class Child:
    """One MLflow child run a stage contributes: name, params, metrics, artifact files."""

    name: str
    params: dict
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    #: the ``method`` tag ``oodlib compare`` groups by (default: the name)
    method: str | None = None


def per_set_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """``{dataset}.{metric}`` → value of metrics rows (the child-run metric names)."""
    return {f"{r.dataset}.{r.metric}": float(r.value) for r in rows.itertuples()}


@dataclass
class StageResult:
    """Base of every stage's typed result: the committed directory it was read from."""

    path: Path

    def counts(self) -> dict:
        """Row counts for the summary (``{}`` when the stage has none)."""
        return {}

    def metrics(self) -> pd.DataFrame | None:
        """Rows of the ``metrics`` table this stage contributes (task, method, dataset, metric, value)."""
        return None

    def children(self, ctx: Context) -> list[Child]:
        """MLflow child runs of this stage."""
        return []

    def tables(self) -> dict[str, "pa.Table | ShardFiles"]:
        """The published tables this stage contributes (:mod:`jobs.publish`): a small table by
        value, or the files of content-keyed shards; tables of one name from several stages are
        concatenated (e.g. ``quarantine``)."""
        return {}


@dataclass
class ShardFiles:
    """A sharded published table: the shard directories and the sub-directory of their Parquet files."""

    shards: list[Path]
    sub: str


class Stage:
    """Base of a pipeline stage. Subclasses set ``name`` and ``version`` and implement ``key``,
    ``run`` and ``load``; ``enabled`` and ``needs`` default to always / nothing.

    A stage instance lives for one job run, so ``key`` may keep what it computed for ``run``.
    """

    name: ClassVar[str]
    version: ClassVar[int]

    def enabled(self, cfg: JobConfig) -> bool:
        return True

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        """Names of the upstream stages whose results ``key``/``run``/``load`` read."""
        return ()

    def key(self, ctx: Context, up: dict[str, Any]) -> dict:
        """Everything the result depends on (JSON-serializable); hashed into the content key."""
        raise NotImplementedError

    def run(self, ctx: Context, up: dict[str, Any], tmp: Path) -> None:
        """Compute the result into the fresh directory ``tmp`` (committed atomically afterwards)."""
        raise NotImplementedError

    def load(self, ctx: Context, up: dict[str, Any], path: Path) -> StageResult:
        """The typed result of the committed directory ``path``."""
        raise NotImplementedError

    def intact(self, ctx: Context, up: dict[str, Any], path: Path) -> bool:
        """Whether what the committed directory refers to outside itself (e.g. shard directories)
        is intact too; False discards the stage directory so that ``run`` repairs it."""
        return True

    def target(self, ctx: Context, up: dict[str, Any]) -> StageDir:
        return StageDir(ctx.root / self.name, content_key(self.name, self.version, **self.key(ctx, up)))


# --- helpers several stages share -------------------------------------------------------------


def rows_hash(rows: pa.Table) -> str:
    """Content hash of a set of manifest rows (ids, labels, image identity)."""
    import hashlib

    return hashlib.sha256("\x1e".join(sorted(row_identities(rows))).encode()).hexdigest()[:16]


def rows_of(table: pa.Table, dataset: str | list[str], split: str | None = None) -> pa.Table:
    """The rows of ``table`` of one dataset (or several) and, optionally, one split."""
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    mask = pc.is_in(table.column("dataset"), pa.array(names, pa.string()))
    if split is not None:
        mask = pc.and_(mask, pc.equal(table.column("split"), split))
    return table.filter(mask)


def labels_of(rows: pa.Table) -> np.ndarray:
    return np.asarray(rows.column("label").to_pylist())
