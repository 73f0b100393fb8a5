"""Stage outputs: content-keyed directories committed atomically and verified on reuse.

Layout: ``{output}/{experiment}/{stage}/key={content_key}/…``. A stage writes into a temporary
local sibling directory; on success every file is listed in ``_FILES.json`` (size, a BLAKE2b hash,
and the row count of each Parquet file) and ``_SUCCESS`` is written. Then:

* a **local** output renames the directory into place — a crash never leaves a directory that
  looks complete;
* an **object-store** output (``s3://``, ``gs://``; :mod:`jobs.store`) has no atomic rename, so
  the commit is ordered instead: the prefix's leftovers of an earlier crashed upload are cleared,
  every file is uploaded (``_FILES.json`` among them), and ``_SUCCESS`` last. A prefix without
  ``_SUCCESS`` is not committed, whatever else it holds, and is cleared before it is written again.
  The local directory is then renamed into the node's mirror: it *is* the committed content.

A committed directory is immutable (same key = same content), so a node-local copy of it is always
valid: :func:`fetch` downloads a committed directory into the mirror once (only the files
``_FILES.json`` lists, each checked against its size and hash) and the stage code reads local
paths, on the driver and on the workers alike. A mirror copy is used while its ``_SUCCESS`` equals
the store's (a key gc'd and recommitted gets a new one).

Reuse checks that ``_SUCCESS`` is there and every listed file is there with its size (one
listing, cheap, always); :func:`verify` also checks the hashes (``oodlib verify``). A damaged
commit is discarded with a warning and recomputed, never read around.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from jobs import store

log = logging.getLogger("oodlib.storage")
SUCCESS = "_SUCCESS"
UNCOMMITTED = "not committed (no _SUCCESS)"
FILES = "_FILES.json"
#: rows that could not be used, with the stage that found them and why
QUARANTINE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


class DamagedError(RuntimeError):
    """A committed output whose files are not what was committed (missing, resized, altered)."""


def content_key(stage: str, version: int, **inputs) -> str:
    """Hash of everything a stage's result depends on (JSON-serializable ``inputs``)."""
    payload = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    """BLAKE2b (16 bytes, hex) of a local file's bytes, streamed: commit checksums and input identities."""
    with open(path, "rb") as fh:
        return _digest(fh, chunk)


def stored_hash(path: Path, chunk: int = 1 << 22) -> str:
    """:func:`file_hash` of the file in the store behind ``path`` (:mod:`jobs.store`)."""
    fs, where = store.fs_of(path)
    with fs.open_input_stream(where) as fh:
        return _digest(fh, chunk)


def _digest(stream, chunk: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    while block := stream.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def file_list(directory: Path) -> dict[str, dict]:
    """``{relative path: {"size", "hash"[, "rows"]}}`` of every file under ``directory``."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            entry = {"size": p.stat().st_size, "hash": file_hash(p)}
            if p.suffix == ".parquet":
                entry["rows"] = pq.ParquetFile(p).metadata.num_rows
            out[p.relative_to(directory).as_posix()] = entry
    return out


def problems(directory: Path, hashes: bool = False) -> list[str]:
    """What is wrong with a committed directory in the store (empty list = intact): no ``_SUCCESS``
    (:data:`UNCOMMITTED`) or file list, a listed file missing or of another size, with ``hashes``
    also altered content."""
    directory = Path(directory)
    found = store.listing(directory)
    if SUCCESS not in found:
        return [UNCOMMITTED]
    try:
        listed = json.loads(store.read_bytes(directory / FILES))
    except (OSError, ValueError):
        return [f"no readable {FILES} (committed before verified commits, or damaged)"]
    out = []
    for rel, entry in listed.items():
        if rel not in found:
            out.append(f"{rel}: missing")
        elif found[rel] != entry["size"]:
            out.append(f"{rel}: {found[rel]} bytes, committed {entry['size']}")
        elif hashes and stored_hash(directory / rel) != entry["hash"]:
            out.append(f"{rel}: content differs from the commit (hash)")
    return out


def commit_root(path: Path) -> Path:
    """The committed directory (``key=…`` or ``shard-…``) at or above ``path``."""
    path = Path(path)
    for d in (path, *path.parents):
        if d.name.startswith(("key=", "shard-")):
            return d
    raise DamagedError(f"{path}: not inside a committed directory")


def fetch(path: Path) -> Path:
    """``path`` — in or at a committed directory — readable here; returns it. For an object-store
    output the committed directory is copied into this node's mirror unless the mirror holds the
    same commit (equal ``_SUCCESS``); every downloaded file is checked against ``_FILES.json``. A
    no-op for a local output."""
    if not store.is_remote(path):
        return path
    root = commit_root(path)
    try:
        success = store.read_bytes(root / SUCCESS)
    except FileNotFoundError:
        raise DamagedError(f"{store.uri(root)}: not committed (no {SUCCESS}); rerun the job (it recomputes it)") from None
    if (root / SUCCESS).is_file() and (root / SUCCESS).read_bytes() == success:
        return path
    listed = json.loads(store.read_bytes(root / FILES))
    tmp = root.with_name(f".fetch-{root.name}-{uuid.uuid4().hex[:8]}")
    try:
        store.download(root, sorted(listed), tmp)
        for rel, entry in listed.items():
            if (tmp / rel).stat().st_size != entry["size"] or file_hash(tmp / rel) != entry["hash"]:
                raise DamagedError(f"{store.uri(root / rel)}: differs from its commit; `oodlib verify --repair` discards it")
        (tmp / FILES).write_text(json.dumps(listed, indent=0))
        (tmp / SUCCESS).write_bytes(success)
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process of this node fetched it meanwhile
            if (root / SUCCESS).read_bytes() != success:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass(frozen=True)
class StageDir:
    """The committed location of one stage result (or shard)."""

    root: Path  # {output}/{experiment}/{stage}
    key: str
    #: the directory is ``{prefix}{key}``; shards inside a published table use ``shard-`` (a
    #: ``key=`` directory would read as a hive partition to the table's readers)
    prefix: str = "key="

    @property
    def path(self) -> Path:
        return self.root / f"{self.prefix}{self.key}"

    @classmethod
    def of(cls, path: Path) -> "StageDir":
        """The StageDir whose directory is ``path``."""
        path = Path(path)
        prefix = "shard-" if path.name.startswith("shard-") else "key="
        return cls(path.parent, path.name.removeprefix(prefix), prefix)

    def committed(self, hashes: bool = False) -> bool:
        """True when committed (in the store) and intact. A commit whose files are not what was
        committed is discarded (with a warning) so that it is recomputed — never read around."""
        found = problems(self.path, hashes)
        if found == [UNCOMMITTED]:
            return False
        if found:
            log.warning("discarding damaged commit %s (recomputed): %s", store.uri(self.path), "; ".join(found[:5]))
            discard(self.path)
            return False
        return True

    @contextmanager
    def writing(self, meta: dict | None = None) -> Iterator[Path]:
        """Yield a fresh temporary directory; on success list its files, write ``_SUCCESS`` and
        commit it (the module docstring: renamed into place, or uploaded with ``_SUCCESS`` last).

        On an exception the temporary directory is removed and nothing is committed. If another
        writer committed the same key meanwhile, its result is kept (same key = same content).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{self.key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            listed = file_list(tmp)
            (tmp / FILES).write_text(json.dumps(listed, indent=0))
            (tmp / SUCCESS).write_text(json.dumps({"key": self.key, "time": time.time(), **(meta or {})}, default=str))
            if self.committed():
                shutil.rmtree(tmp)
                return
            discard(self.path)  # an incomplete leftover without _SUCCESS (a crashed write or upload)
            store.upload(tmp, [*listed, FILES], self.path)
            store.upload(tmp, [SUCCESS], self.path)  # last: the commit point of an object store
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def discard(path: Path) -> None:
    """Remove a damaged or incomplete commit: locally renamed away first (atomic), then deleted;
    in an object store the prefix is deleted (it no longer has a ``_SUCCESS`` once that is gone)."""
    if store.is_remote(path):
        store.delete(path / SUCCESS)
        store.delete(path)
        return
    if not path.exists():
        return
    trash = path.with_name(f".discarded-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def committed_rows(directory: Path) -> int:
    """Rows of the Parquet files under ``directory`` as recorded at commit time (the nearest
    ``_FILES.json`` at or above it)."""
    directory = fetch(Path(directory))
    for root in (directory, *directory.parents):
        if (root / FILES).is_file():
            prefix = directory.relative_to(root).as_posix()
            prefix = "" if prefix == "." else prefix + "/"
            listed = json.loads((root / FILES).read_text())
            return sum(e.get("rows", 0) for rel, e in listed.items() if rel.startswith(prefix))
    raise DamagedError(f"{directory}: not inside a verified commit (no {FILES})")


def stage_dir(output: str | Path, experiment: str, stage: str, key: str) -> StageDir:
    return StageDir(store.root_path(output) / experiment / stage, key)


# --- Arrow conversions at the write boundary ---


def vector_column(values: np.ndarray) -> pa.FixedSizeListArray:
    """N×D float array → Arrow ``fixed_size_list<float32>[D]``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"vector column needs a 2-D array, got shape {values.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def vector_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed-size-list column → N×D float32 array (zero-copy where possible)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)


def column_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A features-table column as NumPy: a vector column N×D float32, a scalar column (N,)."""
    if pa.types.is_fixed_size_list(column.type):
        return vector_to_numpy(column)
    return column.to_numpy(zero_copy_only=False)


def committed_dataset(paths: Path | list[Path]) -> pads.Dataset:
    """One or several (hive-partitioned) Parquet directories of committed outputs as one pyarrow
    dataset (fetched here first, :func:`fetch`). Every file is part of it (none is skipped as
    invalid), and the rows on disk must equal the rows committed, else :class:`DamagedError`."""
    dirs = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    parts = []
    for d in dirs:
        expected = committed_rows(d)
        if not any(d.rglob("*.parquet")):
            if expected:
                raise DamagedError(f"{d}: no Parquet files, {expected} rows committed; rerun the job (it recomputes them)")
            continue
        try:
            part = pads.dataset(d, format="parquet", partitioning="hive")
            on_disk = part.count_rows()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DamagedError(f"{d}: unreadable Parquet ({exc}); rerun the job (it recomputes it)") from exc
        if on_disk != expected:
            raise DamagedError(f"{d}: {on_disk} rows on disk, {expected} committed; rerun the job (it recomputes it)")
        parts.append(part)
    if not parts:
        raise FileNotFoundError(f"no Parquet files under {dirs[:3]}{' …' if len(dirs) > 3 else ''}")
    return parts[0] if len(parts) == 1 else pads.dataset(parts)


def read_table(paths: Path | list[Path], columns: list[str] | None = None, filter=None) -> pa.Table:
    """The ``columns`` of the rows matching ``filter`` (a pyarrow expression; on the partition
    column ``dataset`` it skips whole files) of :func:`committed_dataset`, read batch by batch."""
    dataset = committed_dataset(paths)
    schema = dataset.schema if columns is None else pa.schema([dataset.schema.field(c) for c in columns])
    return pa.Table.from_batches(dataset.to_batches(columns=columns, filter=filter), schema=schema)


def rows_filter(parts: dict[str, tuple[str, ...] | None]):
    """A filter expression for the rows of ``{dataset: its splits, or None for every split}``."""
    terms = [pc.field("dataset") == d if splits is None else (pc.field("dataset") == d) & pc.field("split").isin(list(splits))
             for d, splits in parts.items()]
    out = terms[0]
    for t in terms[1:]:
        out = out | t
    return out


def parquet_rows(directory: Path) -> int:
    """Rows in every Parquet file under ``directory`` (from the footers; 0 if none)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(directory).rglob("*.parquet"))


def write_table(table: pa.Table, directory: Path, name: str = "part-0.parquet") -> Path:
    """Write one Parquet file into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    pq.write_table(table, path)
    return path


def verify_tree(root: Path, repair: bool = False, progress=None) -> tuple[int, dict[Path, list[str]]]:
    """Hash-check every committed directory under ``root`` in the store (stage directories and
    shards): (number checked, {damaged directory: its problems}). ``repair`` discards the damaged
    ones, so the next run recomputes them."""
    commits = sorted({(Path(root) / rel).parent for rel in store.listing(Path(root))
                      if rel.endswith(SUCCESS) and Path(rel).name == SUCCESS and not Path(rel).parent.name.startswith(".")})
    damaged = {}
    for i, d in enumerate(commits):
        found = problems(d, hashes=True)
        if found:
            damaged[d] = found
            if repair:
                discard(d)
        if progress is not None:
            progress(i + 1, len(commits))
    return len(commits), damaged
