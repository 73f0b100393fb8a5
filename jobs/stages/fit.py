"""FIT: reduce the ID training features to fitted state (``fit/key=…/``).

What the configured detectors need (class sums and counts, Σhhᵀ, an activation sketch) is
reduced in Ray tasks, one partial per shard (its features files), and merged on the driver in file order
(deterministic) — never through actor-local state, which a retry would double-count. The banks of
KNN and NNGuide are drawn in the same tasks (their seeded sample by image id,
:class:`oodlib.detectors.knn.SampledBank`): the driver holds only the sample, never the train split.
Other detectors fitted on rows are fitted in Ray tasks, one per set of rows (``fit_split``, its
columns and ``fit_fraction``: a seeded fraction, the same rows EMBED computed their columns on,
:mod:`jobs.rows`), which read those rows and return the fitted state — the driver never holds
them — while the driver fits the rest from the statistics. Writes ``head.npz`` (W, b), ``class_means.npy``,
``contribution.npy`` (LINE's C, D×C) and one ``detectors/<column>.safetensors`` per detector
(the estimator's own state file, no pickle). Keyed by the ID-train rows, the model and the
detector settings — new test images do not refit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import JobConfig
from jobs.rows import FIT_SEED
from jobs.runtime import init_ray
from jobs.stages.base import Context, Stage, StageResult, rows_hash, rows_of
from jobs.storage import column_numpy, vector_to_numpy
from jobs.workers import cluster_cpus, ordered_map
from oodlib.contribution import contribution_matrix
from oodlib.detectors import Detector, Head
from oodlib.detectors.knn import SampledBank
from oodlib.sampling import sample_mask, unit_hash
from oodlib.stats import ActivationSketch, ClassMoments, FitStats


@dataclass
class FitResult(StageResult):
    detectors: dict[str, Detector]  # fitted, keyed by score column


class FitStage(Stage):
    name = "fit"
    version = 6  # 5: banks sampled by image id in the workers; fit_fraction; 6: fit splits read in the workers

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
        samples = tuple(dict.fromkeys(d.bank_sample() for d in detectors.values() if isinstance(d, SampledBank)))
        stats, banks = train_stats(ctx, dirs, needs(detectors), samples)
        expected = id_train_rows(ctx, up)
        if stats.moments.counts.sum() != expected:
            raise storage.DamagedError(f"FIT read {stats.moments.counts.sum()} ID-train feature rows; the manifest has "
                                       f"{expected} usable ones that EMBED did not quarantine")

        # the detectors fitted on rows fit in Ray tasks (the rows never reach the driver), meanwhile the others here
        groups = row_groups(detectors, {d.key: d.fit_fraction for d in ctx.detectors})
        on_rows = {k for keys in groups.values() for k in keys}
        refs = submit_row_fits(train_files(dirs, ctx.cfg.data.id_dataset), groups, detectors, ctx.head)
        fit_from_stats({k: d for k, d in detectors.items() if k not in on_rows}, stats, ctx.head, banks)
        collect_row_fits(refs, detectors, ctx.cfg.runtime.stall_timeout_s)
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


def read_files(paths: list[str], columns: list[str]) -> pa.Table:
    """The rows of features files, in the order given."""
    return pa.concat_tables([pq.read_table(storage.fetch(Path(p)), columns=columns) for p in paths])


def file_partial(paths: list[str], num_classes: int, dim: int, second: bool, activations: bool, samples: tuple = (),
                 chunk: int = 4096) -> tuple[FitStats, list[tuple[np.ndarray, np.ndarray]]]:
    """FitStats of the ID-train rows of one shard's features files, summed chunk by chunk in row
    order, and for each bank sample (fraction, seed, minimum) the ``u`` of every train row (8 bytes
    a row) and the features of those with ``u < fraction``."""
    table = read_files(paths, ["features", "label", "split", *(["image_id"] if samples else [])])
    table = table.filter(pc.equal(table.column("split"), "train"))
    total = FitStats(ClassMoments(np.zeros(num_classes, np.int64), np.zeros((num_classes, dim)), np.zeros((dim, dim)) if second else None),
                     ActivationSketch(np.zeros(0, np.uint32), np.zeros(0, np.int64)) if activations else None)
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        total = total.merge(FitStats.from_batch(vector_to_numpy(part.column("features")), part.column("label").to_numpy(),
                                                num_classes, second, activations))
    drawn = []
    for fraction, seed, minimum in samples:
        u = unit_hash(table.column("image_id").to_pylist(), seed)
        drawn.append((u, vector_to_numpy(table.column("features").filter(pa.array(u < fraction)))))
    return total, drawn


def train_files(feature_dirs: list[Path], id_dataset: str) -> list[list[str]]:
    """The features files holding ID rows, in a fixed order: one list per shard (a Ray task's unit;
    EMBED may write many small files per shard), by name within it."""
    groups = [[str(p) for p in sorted((storage.fetch(Path(d)) / f"dataset={id_dataset}").glob("*.parquet"))] for d in feature_dirs]
    return [g for g in groups if g]


def train_stats(ctx: Context, feature_dirs: list[Path], needed: set[str], samples: tuple = ()) -> tuple[FitStats, dict]:
    """FitStats of the ID-train rows and the drawn bank of each sample (fraction, seed, minimum):
    one Ray task per shard (reads its files inside the task), the partials merged on the driver
    **in file order** — float sums do not depend on which task finishes first, so the same rows
    give the same bytes; a bank keeps the rows in file order. Returns (stats, {sample: N×D bank})."""
    import ray

    files = train_files(feature_dirs, ctx.cfg.data.id_dataset)
    if not files:
        raise ValueError(f"no features of the ID dataset {ctx.cfg.data.id_dataset!r} to fit on")
    model = ctx.model
    task = ray.remote(num_cpus=1)(file_partial)
    args = (model.num_classes, model.feature_dim, "second" in needed, "activations" in needed, samples)
    total, parts = None, [[] for _ in samples]
    for stats, drawn in ordered_map(lambda f: task.remote(f, *args), files, 2 * cluster_cpus(), ctx.cfg.runtime.stall_timeout_s,
                                    "FIT (partial sums per shard)"):
        total = stats if total is None else total.merge(stats)
        for acc, (u, h) in zip(parts, drawn):  # copies: a view would pin the task's whole result in the object store
            acc.append((np.array(u), np.array(h)))
    if total.moments.counts.sum() == 0:
        raise ValueError(f"no ID training rows of {ctx.cfg.data.id_dataset!r} to fit on")
    banks = {}
    for (fraction, seed, minimum), acc in zip(samples, parts):
        u = np.concatenate([a[0] for a in acc])
        drawn = sample_mask(u, fraction, minimum)
        if drawn.sum() == (u < fraction).sum():
            banks[fraction, seed, minimum] = np.concatenate([a[1] for a in acc])
        else:  # fewer than `minimum` rows below the fraction (a small train split): another pass for the top-up
            below = float(np.nextafter(u[drawn].max(), 1.0))
            task = ray.remote(num_cpus=1)(file_rows)
            banks[fraction, seed, minimum] = np.concatenate([
                part[0] for part in ordered_map(lambda f: task.remote(f, "train", (), below, seed), files, 2 * cluster_cpus(),
                                                ctx.cfg.runtime.stall_timeout_s, "FIT (bank rows)")])
    return total, banks


def file_rows(paths: list[str], split: str, columns: tuple[str, ...], fraction: float, seed: int = FIT_SEED) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features, labels, {column: values}) of the rows of ``split`` in one shard's features files
    whose ``u(image_id, seed) < fraction`` (:mod:`jobs.rows`: the rows EMBED computed their columns on)."""
    table = read_files(paths, ["image_id", "features", "label", "split", *columns])
    table = table.filter(pc.equal(table.column("split"), split))
    if fraction < 1:
        table = table.filter(pa.array(unit_hash(table.column("image_id").to_pylist(), seed) < fraction))
    return vector_to_numpy(table.column("features")), table.column("label").to_numpy(), {c: column_numpy(table.column(c)) for c in columns}


def split_rows(files: list[list[str]], split: str, columns: tuple[str, ...], fraction: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """The seeded ``fraction`` (1 = all) of the ID ``split`` of the features ``files`` (features,
    labels, columns), read shard by shard in file order, in this process — in a Ray task no nested
    tasks: a task blocked on others makes Ray start more worker processes (each importing torch)."""
    parts = [file_rows(f, split, columns, fraction) for f in files]
    h = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return h, y, {c: np.concatenate([p[2][c] for p in parts]) for c in columns}


RowGroup = tuple[str, tuple[str, ...], float]  # (split, columns, fraction): the rows a detector is fitted on


def row_groups(detectors: dict[str, Detector], fractions: dict[str, float]) -> dict[RowGroup, list[str]]:
    """{(split, columns, fraction): the detector keys fitted on those rows} — every detector fitted
    on rows (``bank`` in its fit needs, or a ``fit_split`` other than train) but the
    :class:`SampledBank` ones (their banks are drawn with the partial sums)."""
    groups: dict[RowGroup, list[str]] = {}
    for key, det in detectors.items():
        if not isinstance(det, SampledBank) and ("bank" in det.fit_needs or det.fit_split != "train"):
            groups.setdefault((det.fit_split, det.fit_columns, fractions.get(key, 1.0)), []).append(key)
    return groups


def fit_on_rows(files: list[list[str]], group: RowGroup, specs: dict[str, tuple[str, dict]], head: Head) -> dict[str, dict]:
    """A Ray task: load the rows of ``group`` and fit the detectors ``specs`` ({column: (registry
    name, hyperparameters)}) on them; returns {column: fitted state_dict}. The rows live in this
    worker only — the driver never holds a split."""
    from oodlib.detectors import DETECTORS

    h, y, extras = split_rows(files, *group)
    states = {}
    for key, (name, params) in specs.items():
        det = DETECTORS[name](**params)
        if det.fit_columns:
            det.fit(h, y, head, extras=extras)
        else:
            det.fit(h, y, head)
        states[key] = det.state_dict()
    return states


def submit_row_fits(files: list[list[str]], groups: dict[RowGroup, list[str]], detectors: dict[str, Detector], head: Head) -> dict:
    """One :func:`fit_on_rows` task per row group, submitted at once; {group: its ObjectRef}."""
    import ray

    task = ray.remote(num_cpus=1)(fit_on_rows)
    return {g: task.remote(files, g, {k: (detectors[k].name, detectors[k].params()) for k in keys}, head) for g, keys in groups.items()}


def collect_row_fits(refs: dict, detectors: dict[str, Detector], stall_timeout_s: float | None) -> None:
    """Load the fitted states of :func:`submit_row_fits`' tasks into ``detectors``."""
    groups = list(refs)
    for states in ordered_map(lambda g: refs[g], groups, len(groups), stall_timeout_s, "FIT (detectors fitted on rows)"):
        for key, state in states.items():  # writable copies: the object store's arrays are read-only
            detectors[key].load_state_dict({a: np.array(v) for a, v in state.items()})


def fit_from_stats(detectors: dict[str, Detector], stats: FitStats, head: Head, banks: dict) -> None:
    """Fit the detectors not fitted on rows: a :class:`SampledBank` on its drawn bank
    (``banks[det.bank_sample()]``), every other one from the merged ID-train statistics."""
    for det in detectors.values():
        if isinstance(det, SampledBank):
            det.fit_bank(banks[det.bank_sample()], head)
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
