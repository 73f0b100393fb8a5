"""Stage outputs: content-keyed directories committed atomically.

Layout: ``{output}/{experiment}/{stage}/key={content_key}/…`` plus ``_SUCCESS``. A stage writes
into a temporary sibling directory and renames it into place when done, so a crash never leaves a
directory that looks complete; a directory with ``_SUCCESS`` is reused instead of recomputed.
"""
from __future__ import annotations

import hashlib
import json
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

SUCCESS = "_SUCCESS"
#: rows that could not be used, with the stage that found them and why
QUARANTINE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


def content_key(stage: str, version: int, **inputs) -> str:
    """Hash of everything a stage's result depends on (JSON-serializable ``inputs``)."""
    payload = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 (16 hex chars) of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StageDir:
    """The committed location of one stage result."""

    root: Path  # {output}/{experiment}/{stage}
    key: str

    @property
    def path(self) -> Path:
        return self.root / f"key={self.key}"

    @property
    def done(self) -> bool:
        return (self.path / SUCCESS).is_file()

    @contextmanager
    def writing(self, meta: dict | None = None) -> Iterator[Path]:
        """Yield a fresh temporary directory; on success write ``_SUCCESS`` and rename into place.

        On an exception the temporary directory is removed and nothing is committed. If another
        writer committed the same key meanwhile, its result is kept (same key = same content).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{self.key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / SUCCESS).write_text(json.dumps({"key": self.key, "time": time.time(), **(meta or {})}, default=str))
            if self.path.exists():
                if self.done:
                    shutil.rmtree(tmp)
                    return
                shutil.rmtree(self.path)  # an incomplete leftover without _SUCCESS
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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


def read_table(paths: Path | list[Path], columns: list[str] | None = None, filter=None) -> pa.Table:
    """Read one or several (hive-partitioned) Parquet directories into one table; ``filter`` is a
    pyarrow expression."""
    dirs = [paths] if isinstance(paths, (str, Path)) else list(paths)
    parts = [pads.dataset(d, format="parquet", partitioning="hive", exclude_invalid_files=True) for d in dirs if any(Path(d).rglob("*.parquet"))]
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
