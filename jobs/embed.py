"""EMBED: decode every image once, run the model once, write the ``features`` table.

A Ray Data ``map_batches`` actor pool (one GPU per actor when the cluster has GPUs, CPU
otherwise) turns manifest batches into feature rows. Images that cannot be decoded get a
``quarantine_reason`` and go to the ``quarantine`` table; the rest go to ``features``
(partitioned by dataset). Input rows = feature rows + quarantined rows.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from jobs.storage import StageDir, vector_column, write_table
from oodlib.data.decode import decode_batch
from oodlib.device import resolve_device
from oodlib.models import ModelAdapter, build_model

STAGE_VERSION = 1
PASS_THROUGH = ("image_id", "dataset", "split", "label", "subset")
QUARANTINE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to rebuild the driver's model exactly: architecture + state dict ref."""

    name: str
    num_classes: int
    state: object  # ray.ObjectRef to {param name: np.ndarray}, or the dict itself
    device: str = "auto"


def model_state_arrays(model: ModelAdapter) -> dict[str, np.ndarray]:
    """The model's state dict as NumPy arrays (what the driver ships to actors)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def rebuild_model(name: str, num_classes: int, state: dict[str, np.ndarray], device: torch.device) -> ModelAdapter:
    """Architecture ``name`` with the shipped weights, in eval mode on ``device``."""
    model = build_model(name, num_classes)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.to(device).eval()


@torch.inference_mode()
def embed_batch(model: ModelAdapter, batch: pa.Table, device: torch.device) -> pa.Table:
    """Features and logits for one manifest batch.

    Returns one row per input row: the pass-through columns, ``pred`` (int32), ``logits`` [C],
    ``features`` [D] (zeros for a quarantined row) and ``quarantine_reason`` (null when fine).
    """
    images = batch.column("image").to_pylist()
    paths = batch.column("path").to_pylist()
    x, reasons = decode_batch(images, paths, model.preprocess)
    n, ok = batch.num_rows, np.array([r is None for r in reasons], bool)
    feats = np.zeros((n, model.feature_dim), np.float32)
    logits = np.zeros((n, model.num_classes), np.float32)
    if ok.any():
        h = model.features(x.to(device, non_blocking=True))
        f = model.head(h)
        feats[ok] = h.float().cpu().numpy()
        logits[ok] = f.float().cpu().numpy()
    finite = np.isfinite(feats).all(1) & np.isfinite(logits).all(1)
    for i in np.flatnonzero(ok & ~finite):
        reasons[i] = "non-finite features or logits"
    pred = np.where(ok & finite, logits.argmax(1), -1).astype(np.int32)
    cols = {c: batch.column(c) for c in PASS_THROUGH}
    cols["label"] = cols["label"].cast(pa.int32())
    return pa.table(
        {
            **cols,
            "pred": pa.array(pred),
            "logits": vector_column(logits),
            "features": vector_column(feats),
            "quarantine_reason": pa.array(reasons, pa.string()),
        }
    )


class EmbedActor:
    """Ray Data callable class: loads the model once per actor, embeds batches."""

    def __init__(self, spec: ModelSpec, num_threads: int = 1) -> None:
        import ray

        # intra-op threads = the CPUs Ray reserved for this actor
        torch.set_num_threads(max(1, num_threads))
        state = ray.get(spec.state) if isinstance(spec.state, ray.ObjectRef) else spec.state
        self.device = resolve_device(spec.device)
        self.model = rebuild_model(spec.name, spec.num_classes, state, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_batch(self.model, batch, self.device)


def gpus_per_actor(requested: str | float) -> float:
    """GPUs per EMBED actor: ``auto`` → 1 when the Ray cluster has GPUs, else 0.

    A request for GPUs on a cluster without any fails at once (Ray would otherwise wait ~30 min).
    """
    import ray

    available = ray.cluster_resources().get("GPU", 0.0)
    if requested == "auto":
        return 1.0 if available >= 1 else 0.0
    if requested > 0 and available < requested:
        raise RuntimeError(
            f"embed.num_gpus_per_actor={requested} but the Ray cluster has {available:g} GPUs; "
            "set it to 0 or 'auto', or add GPU workers"
        )
    return float(requested)


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def run_embed(
    manifest: pa.Table, spec: ModelSpec, target: StageDir, batch_size: int, num_actors: int,
    num_gpus: float, num_cpus: float,
) -> dict:
    """Embed ``manifest`` through a Ray Data actor pool and commit ``features/`` and ``quarantine/``.

    Returns counts: ``{"input": n, "features": n_ok, "quarantined": n_bad, "seconds": …}``.
    """
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    started = time.time()
    ds = ray.data.from_arrow(_blocks(manifest, batch_size))
    out = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"spec": spec, "num_threads": int(num_cpus)},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    ).materialize()
    good = out.filter(expr=col("quarantine_reason").is_null()).drop_columns(["quarantine_reason"])
    bad = out.filter(expr=col("quarantine_reason").is_not_null())
    with target.writing() as tmp:
        good.write_parquet(str(tmp / "features"), partition_cols=["dataset"])
        n_bad = bad.count()
        quarantine = (
            pa.Table.from_pylist(
                [
                    {"image_id": r["image_id"], "dataset": r["dataset"], "split": r["split"], "stage": "embed", "reason": r["quarantine_reason"]}
                    for r in bad.select_columns(["image_id", "dataset", "split", "quarantine_reason"]).take_all()
                ],
                schema=QUARANTINE_SCHEMA,
            )
            if n_bad
            else QUARANTINE_SCHEMA.empty_table()
        )
        write_table(quarantine, tmp / "quarantine")
        counts = {"input": manifest.num_rows, "features": good.count(), "quarantined": n_bad}
        if counts["features"] + counts["quarantined"] != counts["input"]:
            raise RuntimeError(f"EMBED row counts do not reconcile: {counts}")
        counts["seconds"] = round(time.time() - started, 2)
        (tmp / "counts.json").write_text(json.dumps(counts))
    return counts
