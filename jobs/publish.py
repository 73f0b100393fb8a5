"""Published tables: one Delta Lake table per output, one commit per run.

``{output}/{experiment}/tables/<name>/`` — ``features``, ``scores``, ``risks``, ``graph_scores``,
``metrics``, ``quarantine`` (and ``verdicts``). Each run commits an *overwrite*: the current
version holds exactly this run's rows, earlier nights stay readable by version or timestamp (time
travel), two concurrent runs never interleave rows (a Delta commit is atomic), and the commit's
metadata carries ``oodlib_run_id`` and ``config_hash``. DuckDB (``delta_scan``), Polars
(``scan_delta``), pandas/pyarrow (``deltalake.DeltaTable``), Spark and Ray Data read them.

``features`` and ``scores`` are not rewritten: their tables reference the Parquet files of the
content-keyed shards (``tables/features/shard-…``), which live inside the table's directory — a
run commits only a new log entry. The small tables are written as new files each run.

With an object-store output the tables are in the store (``s3://…/tables/<name>``, named by
:func:`jobs.store.uri`); delta-rs reads the same environment variables as pyarrow (endpoint,
credentials, ``AWS_ALLOW_HTTP``). Its commits use delta-rs's default log store, which writes each
``_delta_log`` entry with a conditional put (``If-None-Match: *``) — safe for concurrent runs on
S3 (since 2024), GCS, MinIO and R2, with no lock table; ``AWS_S3_ALLOW_UNSAFE_RENAME`` is
deliberately not set (two concurrent runs could then overwrite each other's commit).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import store
from jobs.storage import FILES, SUCCESS

PARTITION = "dataset"


def metadata(run_id: str, config_hash: str, **extra: str) -> dict[str, str]:
    return {"oodlib_run_id": run_id, "config_hash": config_hash, **{k: str(v) for k, v in extra.items() if v is not None}}


def _commit(table_root: Path, write, meta: dict[str, str], attempts: int = 5) -> int:
    """Run ``write(commit_properties)``; retry when a concurrent run committed first (each commit
    replaces the whole table, so the last one wins and no version mixes two runs). Returns the
    table's new version."""
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties

    for attempt in range(attempts):
        try:
            write(CommitProperties(custom_metadata=meta))
            return DeltaTable(store.uri(table_root)).version()
        except CommitFailedError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def publish_shards(table_root: Path, shard_dirs: list[Path], sub: str, meta: dict[str, str]) -> int:
    """Commit the ``sub`` Parquet files (``<shard>/<sub>/dataset=…/*.parquet``) of ``shard_dirs``
    — directories under ``table_root`` — as the table's new version (no data rewritten). Reads the
    shards' file lists, commit times and one footer from the store, no data."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    table_root = Path(table_root)
    actions, schema, root = [], None, store.uri(table_root)
    for shard in shard_dirs:
        listed = json.loads(store.read_bytes(shard / FILES))
        committed_ms = int(json.loads(store.read_bytes(shard / SUCCESS))["time"] * 1000)
        for rel, entry in sorted(listed.items()):
            if not (rel.startswith(f"{sub}/") and rel.endswith(".parquet")):
                continue
            part = next(p for p in rel.split("/") if p.startswith(f"{PARTITION}="))
            path = (shard / rel).relative_to(table_root).as_posix()
            if schema is None:
                fs, where = store.fs_of(shard / rel)
                schema = pq.read_schema(where, filesystem=fs).append(pa.field(PARTITION, pa.string()))
            actions.append(AddAction(path, entry["size"], {PARTITION: part.split("=", 1)[1]}, committed_ms,
                                     True, json.dumps({"numRecords": entry["rows"]})))
    if schema is None:
        raise ValueError(f"no {sub} files to publish in {table_root}")
    schema = pa.schema([f for f in schema if f.name != "__index_level_0__"])

    def write(props) -> None:
        if DeltaTable.is_deltatable(root):
            DeltaTable(root).create_write_transaction(actions, "overwrite", schema, partition_by=[PARTITION],
                                                                  commit_properties=props)
        else:
            create_table_with_add_actions(root, Schema.from_arrow(schema), actions, mode="error",
                                          partition_by=[PARTITION], commit_properties=props)

    return _commit(table_root, write, meta)


def publish_table(table_root: Path, table: pa.Table, meta: dict[str, str]) -> int:
    """Overwrite the (small) table at ``table_root`` with ``table`` as a new version."""
    from deltalake import write_deltalake

    return _commit(table_root, lambda props: write_deltalake(store.uri(table_root), table, mode="overwrite", schema_mode="overwrite",
                                                             commit_properties=props), meta)


def referenced_files(table_root: Path, versions: list[int]) -> set[str]:
    """Paths (relative to the table) the given versions of a table read."""
    from deltalake import DeltaTable

    prefix = store.uri(Path(table_root).resolve()) + "/"
    return {u.removeprefix("file://").removeprefix(prefix) for v in versions for u in DeltaTable(store.uri(table_root), version=v).file_uris()}


def is_table(table_root: Path) -> bool:
    """Whether a Delta table was ever committed at ``table_root`` (locally or in the store)."""
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(store.uri(table_root))


def run_versions(table_root: Path) -> list[tuple[int, str | None]]:
    """(version, oodlib run id) of every commit of a table, newest first."""
    from deltalake import DeltaTable

    return [(h["version"], h.get("oodlib_run_id")) for h in DeltaTable(store.uri(table_root)).history()]


def duckdb_connection():
    """A DuckDB connection with the Delta extension loaded from the ``duckdb-ext-delta`` wheel (no
    download): ``con.sql("select * from delta_scan('outputs/digits/tables/scores')")``."""
    import importlib.util

    import duckdb

    con = duckdb.connect()
    ext_root = Path(importlib.util.find_spec("duckdb_ext").submodule_search_locations[0]) / "extensions"
    con.sql(f"SET extension_directory = '{ext_root}'")
    con.load_extension("delta")
    return con
