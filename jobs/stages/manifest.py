"""MANIFEST: the rows this job processes — built (the embedded digits, image folders on disk) or
read (a user manifest), restricted to the configured datasets (and ``limit_per_split``), and
split into usable rows (``rows.parquet``) and quarantined ones (``quarantine.parquet``: duplicate
ids, bad labels … with the reason). Input rows = usable rows + quarantined rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import storage
from jobs.config import ConfigError, JobConfig
from jobs.stages.base import Context, Stage, StageResult, rows_hash, rows_of
from oodlib.data.manifest import (
    manifest_from_cifar_binary, manifest_from_image_folder, manifest_from_image_sets, manifest_from_list_file,
    manifest_from_npy, read_manifest, row_problems, spread_sample,
)


@dataclass
class ManifestResult(StageResult):
    rows: pa.Table  # the usable rows, every manifest column
    quarantined: pa.Table  # storage.QUARANTINE_SCHEMA
    source: str  # the user's manifest file, or this stage's rows file

    def counts(self) -> dict:
        return {"input": self.rows.num_rows + self.quarantined.num_rows, "usable": self.rows.num_rows,
                "quarantined": self.quarantined.num_rows}

    def tables(self) -> dict:
        return {"quarantine": self.quarantined}

    def hash(self) -> str:
        """Content hash of the usable rows."""
        return storage.StageDir.of(self.path).key


class ManifestStage(Stage):
    name = "manifest"
    version = 4  # 4: limit_per_split per (dataset, split, batch)

    def key(self, ctx: Context, up: dict) -> dict:
        cfg = ctx.cfg
        self._table = None
        if cfg.data.source == "manifest":
            source = {"file": storage.file_hash(cfg.data.manifest)}
        elif cfg.data.source == "folders":
            self._table = folders_table(cfg)
            source = {"listing": rows_hash(self._table)}
        else:
            source = {"seed": cfg.data.seed}
        return {"source": cfg.data.source, **source, "datasets": wanted_datasets(cfg), "limit": cfg.data.limit_per_split,
                "num_classes": ctx.model.num_classes, "id": cfg.data.id_dataset}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        cfg = ctx.cfg
        if cfg.data.source == "manifest":
            table = read_manifest(cfg.data.manifest, strict=False)
        elif cfg.data.source == "folders":
            table = self._table
        else:  # the embedded benchmark and its simulated nightly production batches (dataset ``prod``)
            from oodlib.data.digits import build_digits
            from oodlib.data.incoming import digits_incoming_batches

            sets = build_digits(cfg.data.seed)
            table = manifest_from_image_sets([*sets, *digits_incoming_batches(cfg.data.seed, sets=sets)])
        rows, quarantined = select_rows(table, cfg, ctx.model.num_classes)
        storage.write_table(rows, tmp, "rows.parquet")
        storage.write_table(quarantined, tmp, "quarantine.parquet")
        counts = {"manifest_rows": table.num_rows, "usable": rows.num_rows, "quarantined": quarantined.num_rows}
        (tmp / "counts.json").write_text(json.dumps(counts))

    def load(self, ctx: Context, up: dict, path: Path) -> ManifestResult:
        rows = pq.read_table(path / "rows.parquet")
        quarantined = pq.read_table(path / "quarantine.parquet")
        source = str(ctx.cfg.data.manifest) if ctx.cfg.data.source == "manifest" else str(path / "rows.parquet")
        counts = json.loads((path / "counts.json").read_text())
        ctx.progress(f"{counts['manifest_rows']} images in {source}; {rows.num_rows + quarantined.num_rows} for this job, "
                     f"{quarantined.num_rows} quarantined (bad manifest rows)")
        return ManifestResult(path, rows, quarantined, source)


def wanted_datasets(cfg: JobConfig) -> dict[str, list[str]]:
    """The datasets this job needs, by the config field that names them."""
    wanted = {"data.id_dataset": [cfg.data.id_dataset], "data.ood_datasets": cfg.data.ood_datasets,
              "data.extra_datasets": cfg.data.extra_datasets, "data.incoming_datasets": cfg.data.incoming_datasets}
    if cfg.graph.enabled:
        wanted["graph.train_dataset"] = [cfg.graph.train_dataset]
        wanted["graph.oe_dataset"] = [cfg.graph.oe_dataset]
    return wanted


def folders_table(cfg: JobConfig) -> pa.Table:
    """Manifest rows of the configured image sets on disk (``data.sets``)."""
    from oodlib.data.longtail import long_tail_split

    tables = []
    for s in cfg.data.sets:
        if s.kind == "imagefolder":
            t = manifest_from_image_folder(s.root, s.dataset, s.split, ood=s.ood)
        elif s.kind == "list":
            t = manifest_from_list_file(s.list_file, s.root, s.dataset, s.split)
        elif s.kind == "npy":
            t = manifest_from_npy(s.root, s.dataset, s.split)
        else:
            # CIFAR-10: data_batch_1..5.bin / test_batch.bin; CIFAR-100: train.bin / test.bin
            patterns = ("test_batch.bin", "test.bin") if s.split == "test" else ("data_batch_*.bin", "train.bin")
            files = [f for p in patterns for f in sorted(Path(s.root).glob(p))]
            t = manifest_from_cifar_binary(files, s.dataset, s.split, 100 if s.kind == "cifar100-binary" else 10, s.ood)
        if s.imbalance_ratio or s.val_per_class:  # a long tail, or just a held-out balanced val split
            train_idx, val_idx, _ = long_tail_split(t.column("label").to_numpy(), s.imbalance_ratio or 1.0, val_per_class=s.val_per_class)
            tables += [t.take(pa.array(train_idx)), as_val_split(t.take(pa.array(val_idx)))]
        else:
            tables.append(t)
    return pa.concat_tables(tables)


def as_val_split(table: pa.Table) -> pa.Table:
    """Rows moved to the ``val`` split (``/train/`` in their image ids becomes ``/val/``)."""
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["val"] * table.num_rows, pa.string()))
    ids = [i.replace("/train/", "/val/", 1) for i in table.column("image_id").to_pylist()]
    return table.set_column(0, "image_id", pa.array(ids, pa.string()))


def select_rows(manifest: pa.Table, cfg: JobConfig, num_classes: int) -> tuple[pa.Table, pa.Table]:
    """The job's rows, split into usable rows and quarantined ones (with the reason).

    A user manifest is the job's input as a whole: its rows of datasets the config does not name
    (a misspelt "Digits", a null dataset) are quarantined, not dropped. A built manifest (digits,
    folders) holds only the sets it was built from; the ones not needed are left out. At most
    ``limit_per_split`` rows per (dataset, split, batch) are kept (:func:`~oodlib.data.manifest.spread_sample`:
    every subset and class, evenly spaced in manifest order).

    Raises :class:`ConfigError` naming the config field when a dataset is not in the manifest.
    """
    present = set(d for d in manifest.column("dataset").to_pylist() if d)
    wanted = wanted_datasets(cfg)
    for fname, names in wanted.items():
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(f"{fname}: dataset(s) {missing} not in the manifest (has {sorted(present)})")
    datasets = list(dict.fromkeys(n for names in wanted.values() for n in names))
    table = manifest if cfg.data.source == "manifest" else rows_of(manifest, datasets)
    if cfg.data.limit_per_split:
        in_job = pc.fill_null(pc.is_in(table.column("dataset"), pa.array(datasets, pa.string())), False).to_numpy(zero_copy_only=False)
        keep = ~in_job  # rows outside the job's datasets are quarantined below, never sampled away
        keep[in_job] = limited(table.filter(pa.array(in_job)), cfg.data.limit_per_split)
        table = table.filter(pa.array(keep))
    reasons = row_problems(table, num_classes, datasets)
    bad = pa.array([r is not None for r in reasons])
    quarantined = table.filter(bad).select(["image_id", "dataset", "split"])
    quarantined = quarantined.append_column("stage", pa.array(["manifest"] * quarantined.num_rows, pa.string()))
    quarantined = quarantined.append_column("reason", pa.array([r for r in reasons if r is not None], pa.string()))
    table = table.filter(pc.invert(bad))
    id_dataset = cfg.data.id_dataset
    if rows_of(table, id_dataset, "test").num_rows == 0 or rows_of(table, id_dataset, "train").num_rows == 0:
        raise ConfigError(f"data.id_dataset: {id_dataset!r} needs train and test rows in the manifest")
    return table, quarantined.cast(storage.QUARANTINE_SCHEMA)


def limited(table: pa.Table, limit: int) -> np.ndarray:
    """Keep-mask of at most ``limit`` rows per (dataset, split, batch), spread over subsets and
    classes (incoming data keep ``limit`` rows per night)."""
    columns = [np.asarray(table.column(c).fill_null("").to_pylist(), str) for c in ("dataset", "split", "batch")]
    keys = np.char.add(np.char.add(np.char.add(columns[0], "\0"), np.char.add(columns[1], "\0")), columns[2])
    labels = np.asarray(table.column("label").fill_null(-1).to_numpy(zero_copy_only=False))
    subsets = np.asarray(table.column("subset").fill_null("").to_pylist(), str)
    keep = np.zeros(len(keys), bool)
    for k in np.unique(keys):
        rows = np.flatnonzero(keys == k)
        keep[rows[spread_sample(labels[rows], limit, subsets[rows])]] = True
    return keep

