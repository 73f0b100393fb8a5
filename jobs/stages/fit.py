"""FIT: reduce the ID training features to fitted state (``fit/key=…/``).

What the configured detectors need (class sums and counts, Σhhᵀ, an activation sketch) is
reduced in Ray tasks, one partial per features file, and merged on the driver in file order
(deterministic) — never through actor-local state, which a retry would double-count. Detectors that need the feature bank
itself (KNN) get the ID-train features. Writes ``head.npz`` (W, b), ``class_means.npy``,
``contribution.npy`` (LINE's C, D×C) and one ``detectors/<column>.safetensors`` per detector
(the estimator's own state file, no pickle). Keyed by the ID-train rows, the model and the
detector settings — new test images do not refit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import JobConfig
from jobs.runtime import init_ray
from jobs.stages.base import Context, Stage, StageResult, rows_hash, rows_of
from jobs.storage import vector_to_numpy
from jobs.workers import cluster_cpus, ordered_map
from oodlib.contribution import contribution_matrix
from oodlib.detectors import Detector, Head
from oodlib.stats import ActivationSketch, ClassMoments, FitStats


@dataclass
class FitResult(StageResult):
    detectors: dict[str, Detector]  # fitted, keyed by score column


class FitStage(Stage):
    name = "fit"
    version = 4

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest", "embed")

    def key(self, ctx: Context, up: dict) -> dict:
        splits = sorted({"train"} | {det.fit_split for det in ctx.build_detectors().values()})
        rows = {s: rows_hash(rows_of(up["manifest"].rows, ctx.cfg.data.id_dataset, s)) for s in splits}
        return {"model": ctx.model_hash, "train": rows.pop("train"), **({"splits": rows} if rows else {}),
                "detectors": [d.model_dump() for d in ctx.detectors], "preprocess": repr(ctx.model.preprocess)}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        init_ray()
        detectors, dirs = ctx.build_detectors(), up["embed"].feature_dirs
        id_dataset = ctx.cfg.data.id_dataset
        stats = train_stats(ctx, dirs, needs(detectors))
        expected = id_train_rows(ctx, up)
        if stats.moments.counts.sum() != expected:
            raise storage.DamagedError(f"FIT read {stats.moments.counts.sum()} ID-train feature rows; the manifest has "
                                       f"{expected} usable ones that EMBED did not quarantine")

        def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
            rows = (pc.field("dataset") == id_dataset) & (pc.field("split") == split)
            table = storage.read_table(dirs, ["features", "label"], filter=rows)
            return storage.vector_to_numpy(table.column("features")), table.column("label").to_numpy()

        fit_detectors(detectors, stats, ctx.head, load_split)
        save_fitted(tmp, ctx.head, stats, detectors)

    def load(self, ctx: Context, up: dict, path: Path) -> FitResult:
        detectors = {key: type(det).load(path / "detectors" / f"{key}.safetensors") for key, det in ctx.build_detectors().items()}
        return FitResult(path, detectors)


def id_train_rows(ctx: Context, up: dict) -> int:
    """ID-train rows FIT must see: the manifest's usable ones minus those EMBED quarantined."""
    id_dataset = ctx.cfg.data.id_dataset
    rows = rows_of(up["manifest"].rows, id_dataset, "train").num_rows
    quarantine = [d for d in up["embed"].quarantine if storage.committed_rows(d)]
    if quarantine:
        q = storage.read_table(quarantine, ["dataset", "split"])
        rows -= int(pc.sum(pc.and_(pc.equal(q.column("dataset"), id_dataset), pc.equal(q.column("split"), "train"))).as_py() or 0)
    return rows


def needs(detectors: dict[str, Detector]) -> set[str]:
    """Union of the detectors' ``fit_needs`` (moments, second, activations, bank)."""
    return {n for det in detectors.values() for n in det.fit_needs}


def file_partial(path: str, num_classes: int, dim: int, second: bool, activations: bool, chunk: int = 4096) -> FitStats:
    """FitStats of the ID-train rows of one features file, summed chunk by chunk in row order."""
    table = pq.read_table(path, columns=["features", "label", "split"])
    table = table.filter(pc.equal(table.column("split"), "train"))
    total = FitStats(ClassMoments(np.zeros(num_classes, np.int64), np.zeros((num_classes, dim)), np.zeros((dim, dim)) if second else None),
                     ActivationSketch(np.zeros(0, np.uint32), np.zeros(0, np.int64)) if activations else None)
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        total = total.merge(FitStats.from_batch(vector_to_numpy(part.column("features")), part.column("label").to_numpy(),
                                                num_classes, second, activations))
    return total


def train_files(feature_dirs: list[Path], id_dataset: str) -> list[str]:
    """The features files holding ID rows, in a fixed order (shard by shard, then by name)."""
    return [str(p) for d in feature_dirs for p in sorted((Path(d) / f"dataset={id_dataset}").glob("*.parquet"))]


def train_stats(ctx: Context, feature_dirs: list[Path], needed: set[str]) -> FitStats:
    """FitStats of the ID-train rows: one Ray task per features file (reads inside the task), the
    partials merged on the driver **in file order** — float sums do not depend on which task
    finishes first, so the same rows give the same bytes."""
    import ray

    files = train_files(feature_dirs, ctx.cfg.data.id_dataset)
    if not files:
        raise ValueError(f"no features of the ID dataset {ctx.cfg.data.id_dataset!r} to fit on")
    model = ctx.model
    task = ray.remote(num_cpus=1)(file_partial)
    args = (model.num_classes, model.feature_dim, "second" in needed, "activations" in needed)
    total = None
    for part in ordered_map(lambda f: task.remote(f, *args), files, 2 * cluster_cpus(), ctx.cfg.runtime.stall_timeout_s,
                            "FIT (partial sums per features file)"):
        total = part if total is None else total.merge(part)
    if total.moments.counts.sum() == 0:
        raise ValueError(f"no ID training rows of {ctx.cfg.data.id_dataset!r} to fit on")
    return total


def fit_detectors(
    detectors: dict[str, Detector], stats: FitStats, head: Head, load_split: Callable[[str], tuple[np.ndarray, np.ndarray]]
) -> None:
    """Fit every detector: on the rows of its ``fit_split`` when it needs them (a bank of
    features, or the ID val split for e.g. a fitted temperature; each split loaded at most once),
    else from the merged ID-train statistics."""
    banks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for det in detectors.values():
        if "bank" in det.fit_needs or det.fit_split != "train":
            if det.fit_split not in banks:
                banks[det.fit_split] = load_split(det.fit_split)
            det.fit(*banks[det.fit_split], head)
        else:
            det.fit_stats(stats, head)


def save_fitted(tmp: Path, head: Head, stats: FitStats, detectors: dict[str, Detector]) -> None:
    """Write head, class means, LINE's contribution matrix and detector states (no pickle)."""
    np.savez(tmp / "head.npz", W=head.W, b=head.b)
    np.save(tmp / "class_means.npy", stats.moments.means.astype(np.float32))
    np.save(tmp / "class_counts.npy", stats.moments.counts)
    np.save(tmp / "contribution.npy", contribution_matrix(stats.moments, head.W).astype(np.float32))
    (tmp / "detectors").mkdir()
    for key, det in detectors.items():
        det.save(tmp / "detectors" / f"{key}.safetensors")
