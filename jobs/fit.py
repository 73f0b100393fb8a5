"""FIT: reduce the ID training features to fitted state (``fitted/``).

Class sums, counts (and Σhhᵀ when a detector needs them) flow through Ray Data as one partial
per batch and are merged on the driver — never through actor-local state, which a retry would
double-count. Writes ``head.npz`` (W, b), ``class_means.npy`` and one ``detectors/<name>.npz``
per fitted detector.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.storage import StageDir, vector_to_numpy
from oodlib.detectors import Detector, Head
from oodlib.stats import ClassMoments

STAGE_VERSION = 1


def batch_moments(batch: pa.Table, num_classes: int, second: bool) -> pa.Table:
    """One row holding the partial moments of a features batch (counts, sums, outer flattened)."""
    m = ClassMoments.from_batch(vector_to_numpy(batch.column("features")), batch.column("label").to_numpy(), num_classes, second)
    row = {"counts": [m.counts], "sums": [m.sums.ravel()]}
    if second:
        row["outer"] = [m.outer.ravel()]
    return pa.table(row)


def merge_partials(rows: list[dict], num_classes: int, dim: int) -> ClassMoments:
    """Merge the partial rows emitted by :func:`batch_moments`."""
    if not rows:
        raise ValueError("no ID training rows to fit on")
    total = None
    for r in rows:
        outer = np.asarray(r["outer"]).reshape(dim, dim) if "outer" in r else None
        m = ClassMoments(np.asarray(r["counts"]), np.asarray(r["sums"]).reshape(num_classes, dim), outer)
        total = m if total is None else total.merge(m)
    return total


def train_moments(features: list[Path], id_dataset: str, num_classes: int, dim: int, second: bool) -> ClassMoments:
    """ClassMoments of the ID-train rows of the feature shard directories, reduced through Ray Data."""
    import ray
    from ray.data.expressions import col

    ds = ray.data.read_parquet([str(p) for p in features]).filter(expr=(col("dataset") == id_dataset) & (col("split") == "train"))
    parts = ds.map_batches(
        batch_moments, fn_kwargs={"num_classes": num_classes, "second": second}, batch_format="pyarrow", batch_size=4096
    ).take_all()
    return merge_partials(parts, num_classes, dim)


def fit_detectors(
    detectors: dict[str, Detector], moments: ClassMoments, head: Head, load_train: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> None:
    """Fit every detector: from merged statistics when it supports ``fit_stats``, else on the
    ID-train features and labels returned by ``load_train()`` (loaded at most once)."""
    train = None
    for det in detectors.values():
        if hasattr(det, "fit_stats"):
            det.fit_stats(moments, head)
        elif getattr(det, "needs_fit", False):
            train = train if train is not None else load_train()
            det.fit(train[0], train[1], head)


def save_fitted(tmp: Path, head: Head, moments: ClassMoments, detectors: dict[str, Detector]) -> None:
    """Write head, class means and detector states (npz, no pickle) into ``tmp``."""
    np.savez(tmp / "head.npz", W=head.W, b=head.b)
    np.save(tmp / "class_means.npy", moments.means.astype(np.float32))
    np.save(tmp / "class_counts.npy", moments.counts)
    (tmp / "detectors").mkdir()
    for key, det in detectors.items():
        np.savez(tmp / "detectors" / f"{key}.npz", **det.state_dict())


def load_fitted_detectors(fitted: StageDir, detectors: dict[str, Detector]) -> dict[str, Detector]:
    """Load each detector's fitted state from a committed FIT directory (``allow_pickle=False``)."""
    for key, det in detectors.items():
        with np.load(fitted.path / "detectors" / f"{key}.npz", allow_pickle=False) as z:
            det.load_state_dict({k: z[k] for k in z.files})
    return detectors


def load_head(fitted: StageDir) -> Head:
    with np.load(fitted.path / "head.npz", allow_pickle=False) as z:
        return Head(z["W"], z["b"])
