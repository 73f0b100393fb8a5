"""Stage outputs: content-keyed directories committed atomically and verified on reuse.

Layout: ``{output}/{experiment}/{stage}/key={content_key}/…``. A stage writes into a temporary
sibling directory; on success every file is listed in ``_FILES.json`` (size, a BLAKE2b hash, and
the row count of each Parquet file), then ``_SUCCESS`` is written and the directory is renamed
into place — a crash never leaves a directory that looks complete. Reuse checks that every listed
file is there with its size (cheap, always); :func:`verify` also checks the hashes (``oodlib
verify``). A damaged commit is discarded with a warning and recomputed, never read around.
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
import pyarrow.dataset as pads
import pyarrow.parquet as pq

log = logging.getLogger("oodlib.storage")
SUCCESS = "_SUCCESS"
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
    """BLAKE2b (16 bytes, hex) of a file's bytes, streamed: commit checksums and input identities."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
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
    """What is wrong with a committed directory (empty list = intact): no ``_SUCCESS`` or file
    list, a listed file missing or of another size, with ``hashes`` also altered content."""
    directory = Path(directory)
    if not (directory / SUCCESS).is_file():
        return ["not committed (no _SUCCESS)"]
    try:
        listed = json.loads((directory / FILES).read_text())
    except (OSError, ValueError):
        return [f"no readable {FILES} (committed before verified commits, or damaged)"]
    out = []
    for rel, entry in listed.items():
        p = directory / rel
        if not p.is_file():
            out.append(f"{rel}: missing")
        elif p.stat().st_size != entry["size"]:
            out.append(f"{rel}: {p.stat().st_size} bytes, committed {entry['size']}")
        elif hashes and file_hash(p) != entry["hash"]:
            out.append(f"{rel}: content differs from the commit (hash)")
    return out


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
        """True when committed and intact. A commit whose files are not what was committed is
        discarded (with a warning) so that it is recomputed — never read around."""
        if not (self.path / SUCCESS).is_file():
            return False
        found = problems(self.path, hashes)
        if found:
            log.warning("discarding damaged commit %s (recomputed): %s", self.path, "; ".join(found[:5]))
            discard(self.path)
            return False
        return True

    @contextmanager
    def writing(self, meta: dict | None = None) -> Iterator[Path]:
        """Yield a fresh temporary directory; on success list its files, write ``_SUCCESS`` and
        rename it into place.

        On an exception the temporary directory is removed and nothing is committed. If another
        writer committed the same key meanwhile, its result is kept (same key = same content).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{self.key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / FILES).write_text(json.dumps(file_list(tmp), indent=0))
            (tmp / SUCCESS).write_text(json.dumps({"key": self.key, "time": time.time(), **(meta or {})}, default=str))
            if self.path.exists():
                if self.committed():
                    shutil.rmtree(tmp)
                    return
                discard(self.path)  # an incomplete leftover without _SUCCESS
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def discard(path: Path) -> None:
    """Remove a damaged or incomplete commit: renamed away first (atomic), then deleted."""
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
    directory = Path(directory)
    for root in (directory, *directory.parents):
        if (root / FILES).is_file():
            prefix = directory.relative_to(root).as_posix()
            prefix = "" if prefix == "." else prefix + "/"
            listed = json.loads((root / FILES).read_text())
            return sum(e.get("rows", 0) for rel, e in listed.items() if rel.startswith(prefix))
    raise DamagedError(f"{directory}: not inside a verified commit (no {FILES})")


def stage_dir(output: Path, experiment: str, stage: str, key: str) -> StageDir:
    return StageDir(Path(output) / experiment / stage, key)


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


def read_table(paths: Path | list[Path], columns: list[str] | None = None, filter=None) -> pa.Table:
    """Read one or several (hive-partitioned) Parquet directories of committed outputs into one
    table; ``filter`` is a pyarrow expression. Every file is read (none is skipped as invalid),
    and the rows on disk must equal the rows committed, else :class:`DamagedError`."""
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
    dataset = parts[0] if len(parts) == 1 else pads.dataset(parts)
    return dataset.to_table(columns=columns, filter=filter)


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
    """Hash-check every committed directory under ``root`` (stage directories and shards):
    (number checked, {damaged directory: its problems}). ``repair`` discards the damaged ones, so
    the next run recomputes them."""
    commits = sorted(p.parent for p in Path(root).rglob(SUCCESS) if not p.parent.name.startswith("."))
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
