"""FIT: reduce the ID training features to fitted state (``fit/key=…/``).

What the configured detectors need (class sums and counts, Σhhᵀ, an activation sketch) flows
through Ray Data as one partial per batch and is merged on the driver — never through
actor-local state, which a retry would double-count. Detectors that need the feature bank
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
import pyarrow as pa
import pyarrow.compute as pc

from jobs import storage
from jobs.config import JobConfig
from jobs.runtime import init_ray
from jobs.stages.base import Context, Stage, StageResult, rows_hash, rows_of
from jobs.storage import vector_to_numpy
from oodlib.contribution import contribution_matrix
from oodlib.detectors import Detector, Head
from oodlib.stats import ActivationSketch, ClassMoments, FitStats


@dataclass
class FitResult(StageResult):
    detectors: dict[str, Detector]  # fitted, keyed by score column


class FitStage(Stage):
    name = "fit"
    version = 3

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest", "embed")

    def key(self, ctx: Context, up: dict) -> dict:
        train = rows_of(up["manifest"].rows, ctx.cfg.data.id_dataset, "train")
        return {"model": ctx.model_hash, "train": rows_hash(train), "detectors": [d.model_dump() for d in ctx.detectors],
                "preprocess": repr(ctx.model.preprocess)}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        init_ray()
        detectors, model, dirs = ctx.build_detectors(), ctx.model, up["embed"].feature_dirs
        id_dataset = ctx.cfg.data.id_dataset
        stats = train_stats(dirs, id_dataset, model.num_classes, model.feature_dim, needs(detectors))

        def load_train() -> tuple[np.ndarray, np.ndarray]:
            train = (pc.field("dataset") == id_dataset) & (pc.field("split") == "train")
            table = storage.read_table(dirs, ["features", "label"], filter=train)
            return storage.vector_to_numpy(table.column("features")), table.column("label").to_numpy()

        fit_detectors(detectors, stats, ctx.head, load_train)
        save_fitted(tmp, ctx.head, stats, detectors)

    def load(self, ctx: Context, up: dict, path: Path) -> FitResult:
        detectors = {key: type(det).load(path / "detectors" / f"{key}.safetensors") for key, det in ctx.build_detectors().items()}
        return FitResult(path, detectors)


def needs(detectors: dict[str, Detector]) -> set[str]:
    """Union of the detectors' ``fit_needs`` (moments, second, activations, bank)."""
    return {n for det in detectors.values() for n in det.fit_needs}


def batch_partial(batch: pa.Table, num_classes: int, second: bool, activations: bool) -> pa.Table:
    """One row holding the partial statistics of a features batch (arrays flattened)."""
    s = FitStats.from_batch(vector_to_numpy(batch.column("features")), batch.column("label").to_numpy(), num_classes, second, activations)
    row = {"counts": [s.moments.counts], "sums": [s.moments.sums.ravel()]}
    if second:
        row["outer"] = [s.moments.outer.ravel()]
    if activations:
        row["sketch_bins"] = [s.activations.bins]
        row["sketch_counts"] = [s.activations.counts]
    return pa.table(row)


def merge_partials(rows: list[dict], num_classes: int, dim: int) -> FitStats:
    """Merge the partial rows emitted by :func:`batch_partial`."""
    if not rows:
        raise ValueError("no ID training rows to fit on")
    total = None
    for r in rows:
        outer = np.asarray(r["outer"]).reshape(dim, dim) if "outer" in r else None
        moments = ClassMoments(np.asarray(r["counts"]), np.asarray(r["sums"]).reshape(num_classes, dim), outer)
        sketch = ActivationSketch(np.asarray(r["sketch_bins"], np.uint32), np.asarray(r["sketch_counts"], np.int64)) if "sketch_bins" in r else None
        part = FitStats(moments, sketch)
        total = part if total is None else total.merge(part)
    return total


def train_stats(features: list[Path], id_dataset: str, num_classes: int, dim: int, needed: set[str]) -> FitStats:
    """FitStats of the ID-train rows of the feature shard directories, reduced through Ray Data."""
    import ray
    from ray.data.expressions import col

    ds = ray.data.read_parquet([str(p) for p in features], columns=["features", "label", "split", "dataset"])
    ds = ds.filter(expr=(col("dataset") == id_dataset) & (col("split") == "train"))
    kwargs = {"num_classes": num_classes, "second": "second" in needed, "activations": "activations" in needed}
    parts = ds.map_batches(batch_partial, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=4096).take_all()
    return merge_partials(parts, num_classes, dim)


def fit_detectors(
    detectors: dict[str, Detector], stats: FitStats, head: Head, load_train: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> None:
    """Fit every detector: on the feature bank when it needs one (loaded at most once), else from
    the merged statistics."""
    bank = None
    for det in detectors.values():
        if "bank" in det.fit_needs:
            bank = bank if bank is not None else load_train()
            det.fit(bank[0], bank[1], head)
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
