"""The EMBED pass: decode every image once, run the model once (plus the extras), write the
``features`` table of each shard.

A Ray Data ``map_batches`` actor pool (one GPU per actor when the cluster has GPUs, CPU
otherwise) turns manifest batches into feature rows. Images that cannot be decoded get a
``quarantine_reason`` and go to the ``quarantine`` table; the rest go to ``features``
(partitioned by dataset). Input rows = feature rows + quarantined rows, per shard.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import pyarrow.compute  # noqa: F401  (pa.compute)

from jobs.extras import Extra, build_extras
from jobs.shards import commit_shard
from jobs import storage, store
from jobs.storage import QUARANTINE_SCHEMA, StageDir, parquet_rows, vector_column, write_table
from jobs.workers import ModelSpec, fetch, rebuild_model
from oodlib.data.decode import MAX_BYTES, decode_batch
from oodlib.device import resolve_device
from oodlib.models import ModelAdapter

PASS_THROUGH = ("image_id", "dataset", "split", "label", "subset", "batch", "shard")


def embed_batch(
    model: ModelAdapter, batch: pa.Table, device: torch.device, extras: list[Extra] = (), max_bytes: int = MAX_BYTES,
) -> pa.Table:
    """Features, logits and the configured extras for one manifest batch (one decode, one forward).

    Returns one row per input row: the pass-through columns, ``pred`` (int32), ``logits`` [C],
    ``features`` [D], each extra's columns and ``quarantine_reason`` (null when fine).

    An extra is computed only on the rows whose ``extra_rows`` bit mask (:func:`jobs.rows.extra_rows_column`;
    bit i = ``extras[i]``) has its bit — every row when the batch has no such column. On the other
    rows its columns are *missing*: a null scalar, and a vector of NaN (Arrow's Parquet reader cannot
    read null entries of a ``fixed_size_list`` back, so a missing vector is all-NaN, never null);
    :func:`jobs.storage.column_numpy` reads both as NaN. A computed value is always finite (a row
    with a non-finite one is quarantined).
    """
    images = batch.column("image").to_pylist()
    paths = batch.column("path").to_pylist()
    x, reasons = decode_batch(images, paths, model.preprocess, max_bytes)
    n, ok = batch.num_rows, np.array([r is None for r in reasons], bool)
    ok_idx = np.flatnonzero(ok)
    feats = np.zeros((n, model.feature_dim), np.float32)
    logits = np.zeros((n, model.num_classes), np.float32)
    extra_cols = {
        c: np.full((n, w), np.nan, np.float32) if isinstance(w, int) else np.zeros(n, w or np.float32)
        for e in extras for c, w in e.columns.items()
    }
    computed = {c: np.zeros(n, bool) for c in extra_cols}
    if len(ok_idx):
        bits = batch.column("extra_rows").to_numpy()[ok_idx] if "extra_rows" in batch.column_names else None
        need = [np.ones(len(ok_idx), bool) if bits is None else ((bits >> i) & 1).astype(bool) for i in range(len(extras))]
        x = x.to(device, non_blocking=True)
        h, f = extras_pass(model, x, list(extras), need, extra_cols, computed, ok_idx)
        feats[ok_idx] = h.cpu().numpy()
        logits[ok_idx] = f.cpu().numpy()
    finite = np.isfinite(feats).all(1) & np.isfinite(logits).all(1)
    for c, values in extra_cols.items():
        finite &= ~computed[c] | np.isfinite(values.reshape(n, -1)).all(1)
    for i in np.flatnonzero(ok & ~finite):
        reasons[i] = "non-finite features, logits or extras"
    pred = np.where(ok & finite, logits.argmax(1), -1).astype(np.int32)
    cols = {c: batch.column(c) for c in PASS_THROUGH}
    cols["label"] = cols["label"].cast(pa.int32())
    return pa.table(
        {
            **cols,
            "pred": pa.array(pred),
            "logits": vector_column(logits),
            "features": vector_column(feats),
            **{c: vector_column(v) if v.ndim == 2 else pa.array(v, mask=~computed[c]) for c, v in extra_cols.items()},
            "quarantine_reason": pa.array(reasons, pa.string()),
        }
    )


def extras_pass(model: ModelAdapter, x: torch.Tensor, extras: list[Extra], need: list[np.ndarray], out: dict[str, np.ndarray],
                computed: dict[str, np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits (float32, on the device) of the decoded batch ``x``, and each extra on the
    rows it needs (``need[i]`` for ``extras[i]``), written into ``out[column][rows[j]]`` (``computed``
    marks them). Work units: each extra alone on its rows, except the extras that share a pass (the
    layer statistics) — their rows are split by which of them each row needs, one pass per part,
    computing just those. An extra that computes the ordinary forward on the way (conductance, the
    layer pass) gives the features of its rows; the remaining rows get one plain forward."""
    units: list[tuple[list[Extra], np.ndarray]] = []
    sharing: dict[int, list[int]] = {}
    for i, e in enumerate(extras):
        if getattr(e, "shared", None) is None:
            if need[i].any():
                units.append(([e], need[i]))
        else:
            sharing.setdefault(id(e.shared), []).append(i)
    for members in sharing.values():
        signature = np.stack([need[i] for i in members], 1)
        for sig in np.unique(signature[signature.any(1)], axis=0):
            units.append(([extras[i] for i, on in zip(members, sig) if on], (signature == sig).all(1)))

    def rows_of(t: torch.Tensor, m: np.ndarray) -> torch.Tensor:
        return t if m.all() else t[torch.from_numpy(np.flatnonzero(m)).to(t.device)]

    def keep(cols: dict[str, np.ndarray], m: np.ndarray) -> None:
        for c, values in cols.items():
            out[c][rows[m]] = values
            computed[c][rows[m]] = True

    n, device = len(x), x.device
    h = torch.empty((n, model.feature_dim), device=device)
    f = torch.empty((n, model.num_classes), device=device)
    covered = np.zeros(n, bool)
    later = []
    for members, m in units:
        if not hasattr(members[0], "forward"):
            later.append((members, m))
            continue
        xs = rows_of(x, m)
        for e in members:
            e.with_peers(members)
        hs, fs, cols = members[0].forward(model, xs)
        keep(cols, m)
        for e in members[1:]:
            keep(e(model, xs, hs, fs), m)
        new = ~covered[m]
        if new.any():
            at = torch.from_numpy(np.flatnonzero(m)[new]).to(device)
            h[at], f[at] = rows_of(hs.float(), new), rows_of(fs.float(), new)
            covered[m] = True
    if not covered.all():
        with torch.inference_mode():
            hr = model.features(rows_of(x, ~covered))
            fr = model.head(hr)
        at = torch.from_numpy(np.flatnonzero(~covered)).to(device)
        h[at], f[at] = hr.float(), fr.float()
    for members, m in later:
        xs, hs, fs = rows_of(x, m), rows_of(h, m), rows_of(f, m)
        for e in members:
            e.with_peers(members)
            keep(e(model, xs, hs, fs), m)
    return h, f


class EmbedActor:
    """Ray Data callable class: loads the model once per actor, embeds batches."""

    def __init__(self, spec: ModelSpec, num_threads: int = 1) -> None:
        # intra-op threads = the CPUs Ray reserved for this actor
        torch.set_num_threads(max(1, num_threads))
        state = fetch(spec.state)
        self.device = resolve_device(spec.device)
        self.model = rebuild_model(spec.name, spec.num_classes, state, self.device, spec.preprocess)
        self.extras = build_extras(spec.extras, self.model, self.device)
        self.max_bytes = spec.max_image_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_batch(self.model, batch, self.device, self.extras, self.max_bytes)


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def run_embed(
    rows: pa.Table, shard_targets: dict[int, StageDir], spec: ModelSpec, batch_size: int, num_actors: int,
    num_gpus: float, num_cpus: float, scratch: Path, identities: dict[int, list[str]] | None = None,
    reuse: dict[int, tuple[Path, list[str]]] | None = None,
) -> dict[int, dict]:
    """Embed the manifest ``rows`` (with a ``shard`` column) through a Ray Data actor pool and
    commit each shard's ``features/`` (partitioned by dataset), ``quarantine/`` and ``rows/`` (the
    identities of its input rows) to ``shard_targets[shard]``.

    ``reuse[shard] = (previous shard dir, image ids)``: rows whose identity is unchanged since that
    committed shard are copied from it instead of embedded again (``rows`` holds only the rest).
    Returns per-shard counts ``{"input", "features", "quarantined", "reused"}``; a shard whose
    counts do not reconcile is not committed.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    reuse = reuse or {}
    bad = embed_rows(rows, spec, batch_size, num_actors, num_gpus, num_cpus, scratch) if rows.num_rows else None
    n_in = np.bincount(rows.column("shard").to_numpy(), minlength=max(shard_targets) + 1)
    counts = {}
    for shard, target in shard_targets.items():
        features_dir = scratch / "features" / f"shard={shard}"
        mine = bad.filter(pa.compute.equal(bad.column("shard"), shard)) if bad is not None and bad.num_rows else None
        quarantined = [_quarantine_rows(mine)] if mine is not None else []
        n_reused = 0
        if shard in reuse:
            prev, ids = reuse[shard]
            n_reused = copy_rows(prev, ids, features_dir, quarantined)
        counts[shard] = {
            "input": int(n_in[shard]) + n_reused, "features": parquet_rows(features_dir),  # what is on disk
            "quarantined": sum(t.num_rows for t in quarantined), "reused": n_reused,
        }
        if counts[shard]["features"] + counts[shard]["quarantined"] != counts[shard]["input"]:
            raise RuntimeError(f"EMBED shard {shard}: row counts do not reconcile: {counts[shard]}")
        quarantine_dir = scratch / "quarantine" / f"shard={shard}"
        write_table(pa.concat_tables(quarantined) if quarantined else QUARANTINE_SCHEMA.empty_table(), quarantine_dir)
        rows_dir = scratch / "rows" / f"shard={shard}"
        write_table(pa.table({"identity": pa.array((identities or {}).get(shard, []), pa.string())}), rows_dir)
        commit_shard(target, {"features": features_dir, "quarantine": quarantine_dir, "rows": rows_dir}, counts[shard])
    return counts


def embed_rows(rows: pa.Table, spec: ModelSpec, batch_size: int, num_actors: int, num_gpus: float, num_cpus: float, scratch: Path) -> pa.Table:
    """The Ray Data pass: feature rows to ``scratch/features/shard=…/dataset=…``; returns the
    quarantined rows (image_id, dataset, split, shard, quarantine_reason)."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    # GPU actors: a fixed pool, one actor per GPU the cluster has (up to num_actors) from the start —
    # an autoscaling pool would leave GPUs idle while a small wave runs on one; CPU actors autoscale
    min_actors = max(1, min(num_actors, int(ray.cluster_resources().get("GPU", 0) // num_gpus))) if num_gpus > 0 else 1
    out = ray.data.from_arrow(_blocks(rows, batch_size)).map_batches(
        EmbedActor,
        fn_constructor_kwargs={"spec": spec, "num_threads": int(num_cpus)},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=min_actors, max_size=num_actors),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    ).materialize()
    good = out.filter(expr=col("quarantine_reason").is_null()).drop_columns(["quarantine_reason"])
    fs, where = store.fs_of(scratch / "features")  # through the store: the write tasks may run on other nodes
    good.write_parquet(where, filesystem=fs, partition_cols=["shard", "dataset"])
    store.pull(scratch / "features")
    return pa.Table.from_pylist(
        out.filter(expr=col("quarantine_reason").is_not_null())
        .select_columns(["image_id", "dataset", "split", "shard", "quarantine_reason"]).take_all()
    )


def copy_rows(prev: Path, ids: list[str], features_dir: Path, quarantined: list[pa.Table]) -> int:
    """Copy the rows of ``ids`` from a previously committed shard: features into ``features_dir``
    (by dataset), quarantine rows appended to ``quarantined``. Returns how many rows were found."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    prev, wanted = storage.fetch(prev), pa.array(ids, pa.string())
    old = pads.dataset(prev / "features", format="parquet", partitioning="hive").to_table(filter=pads.field("image_id").isin(wanted))
    if old.num_rows:
        pq.write_to_dataset(old, features_dir, partition_cols=["dataset"], basename_template="reused-{i}.parquet")
    q = pq.read_table(prev / "quarantine")
    q = q.filter(pa.compute.is_in(q.column("image_id"), wanted))
    if q.num_rows:
        quarantined.append(q.cast(QUARANTINE_SCHEMA))
    found = old.num_rows + q.num_rows
    if found != len(ids):
        raise RuntimeError(f"EMBED reuse: {len(ids)} rows expected in {prev}, found {found}")
    return found


def _quarantine_rows(bad: pa.Table) -> pa.Table:
    """EMBED failures in the quarantine schema."""
    if bad.num_rows == 0:
        return QUARANTINE_SCHEMA.empty_table()
    n = bad.num_rows
    return pa.table(
        {"image_id": bad.column("image_id"), "dataset": bad.column("dataset"), "split": bad.column("split"),
         "stage": pa.array(["embed"] * n), "reason": bad.column("quarantine_reason")},
        schema=QUARANTINE_SCHEMA,
    )
