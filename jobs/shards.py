"""Deterministic shards of the manifest, for incremental recomputation.

Each image belongs to shard ``sha1(image_id) mod S``. A shard's content hash covers every row
of it (ids, labels, splits and the image itself: the bytes' hash for embedded images, path +
size + mtime for files), so an added, removed or changed image changes exactly one shard.
Per-shard stage outputs are keyed by that hash (plus the model and stage config) and committed
one by one; a stage's *index* (the list of its shard directories) is committed last.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs import store
from jobs.storage import StageDir, fetch


def shard_of(image_ids: list[str], num_shards: int) -> np.ndarray:
    """Shard number (int32) of each image id: first 8 bytes of sha1(id) mod ``num_shards``."""
    return np.fromiter(
        (int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") % num_shards for i in image_ids),
        dtype=np.int32, count=len(image_ids),
    )


def row_digest(image: bytes | None, path: str | None) -> str:
    """Identity of one image's content: hash of the bytes, or path + size + mtime of the file
    (stat, not a read, so hashing a million-file manifest stays cheap; a missing file hashes
    as missing and is quarantined by EMBED)."""
    if image is not None:
        return hashlib.sha1(image).hexdigest()
    try:
        st = os.stat(path)
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except (OSError, TypeError):
        return f"{path}:missing"


def row_identities(table: pa.Table) -> list[str]:
    """Per manifest row: id, dataset, split, label, subset, batch and content digest in one string —
    equal identities mean an EMBED output row can be reused as it is."""
    meta = zip(table.column("image_id").to_pylist(), table.column("dataset").to_pylist(), table.column("split").to_pylist(),
               table.column("label").to_pylist(), table.column("subset").to_pylist(), table.column("batch").to_pylist(),
               table.column("image").to_pylist(), table.column("path").to_pylist())
    return [f"{iid}\x1f{ds}\x1f{sp}\x1f{lab}\x1f{sub}\x1f{bt}\x1f{row_digest(img, path)}"
            for iid, ds, sp, lab, sub, bt, img, path in meta]


def shard_hashes(table: pa.Table, shards: np.ndarray, identities: list[str] | None = None) -> dict[int, str]:
    """Content hash (16 hex chars) of every non-empty shard of a manifest table."""
    rows: dict[int, list[str]] = {}
    for s, ident in zip(shards.tolist(), identities or row_identities(table)):
        rows.setdefault(s, []).append(ident)
    return {s: hashlib.sha256("\x1e".join(sorted(r)).encode()).hexdigest()[:16] for s, r in rows.items()}


def commit_shard(target: StageDir, parts: dict[str, Path | None], meta: dict) -> None:
    """Commit one shard: move each written partition directory (``parts[name]``, e.g. the
    ``shard=7`` directory of a partitioned write; None → an empty one) to ``target/name``."""
    with target.writing(meta) as tmp:
        for name, src in parts.items():
            if src is not None and src.exists():
                shutil.move(str(src), tmp / name)
            else:
                (tmp / name).mkdir()
        (tmp / "counts.json").write_text(json.dumps(meta))


def write_index(directory: Path, shard_dirs: list[Path], root: Path, meta: dict) -> None:
    """Write a stage index into the stage's (uncommitted) directory: its shard directories,
    relative to the experiment directory ``root`` (a copied output tree stays self-contained)."""
    shards = [Path(os.path.relpath(p, root)).as_posix() for p in shard_dirs]
    (directory / "index.json").write_text(json.dumps({"shards": shards, **meta}, indent=1))


def index_shards(index_dir: Path) -> list[Path]:
    """The shard directories a committed stage index lists (``{exp}/{stage}/key=…/index.json``)."""
    index_dir = fetch(Path(index_dir))
    return [index_dir.parent.parent / p for p in json.loads((index_dir / "index.json").read_text())["shards"]]


def index_dirs(index_dir: Path, sub: str) -> list[Path]:
    """The ``sub`` directories (``features``, ``quarantine``, ``scores``) of a committed stage index."""
    return [p / sub for p in index_shards(index_dir)]


def previous_shard(latest: Path, shard: int) -> Path | None:
    """The last committed, intact directory of shard number ``shard`` under one EMBED config, if any."""
    try:
        pointer = json.loads(store.read_bytes(latest / f"shard={shard}.json"))
    except FileNotFoundError:
        return None
    path = Path(os.path.normpath(latest / pointer["path"]))
    return path if StageDir.of(path).committed() else None


def set_previous_shard(latest: Path, shard: int, path: Path) -> None:
    """Point shard number ``shard`` at its newest committed directory (a relative path)."""
    store.write_text(latest / f"shard={shard}.json", json.dumps({"path": os.path.relpath(path, latest)}))


def committed_identities(shard_dir: Path) -> set[str]:
    """Row identities (:func:`row_identities`) of the input rows of a committed shard."""
    import pyarrow.parquet as pq

    return set(pq.read_table(fetch(shard_dir) / "rows").column("identity").to_pylist())

