"""``oodlib gc --config … --keep-runs N``: delete the cached outputs no kept run references.

Kept: the stage directories of the newest N runs (``runs/*.json``), the shard directories those
runs' stage indexes list, and the files the published tables' versions of those runs read (their
Delta logs stay; older versions whose files are gone can no longer be read — the point of gc).
Deleted: every other ``key=…`` stage directory and ``shard-…`` directory under the experiment,
the directories of earlier layouts, stale pointers and run records. Nothing is deleted while it
is referenced, so the next run with an unchanged config still reuses everything.
"""
from __future__ import annotations

import json
from pathlib import Path

from jobs import publish, store
from jobs.shards import index_shards
from jobs.storage import SUCCESS

#: directories of earlier output layouts (before the stage redesign): nothing reads them
LEGACY = ("fitted", "metrics", "scores", "gaussianized", "quarantine", "embed/shards")


def kept_runs(root: Path, files: dict[str, int], keep: int) -> list[dict]:
    """The run records of the newest ``keep`` runs (``files``: the experiment's listing)."""
    records = sorted((rel for rel in files if rel.startswith("runs/") and rel.endswith(".json")), reverse=True)
    return [json.loads(store.read_bytes(root / rel)) for rel in records[:keep]]


def referenced(root: Path, files: dict[str, int], runs: list[dict]) -> set[Path]:
    """Directories the kept runs use: their stage directories and the shards those list."""
    out: set[Path] = set()
    for run in runs:
        for name in run.get("stages", {}).values():
            p = store.local_path(name)
            p = (p if p.is_absolute() else Path.cwd() / p).resolve()
            out.add(p)
            if p.is_relative_to(root) and f"{p.relative_to(root).as_posix()}/index.json" in files:
                out |= {s.resolve() for s in index_shards(p)}
    return out


def _under(rel: str, prefixes: set[str]) -> bool:
    """Whether the relative path ``rel`` is one of ``prefixes`` or inside one."""
    parts = rel.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def collect(root: Path, keep: int, dry_run: bool = False) -> tuple[list[Path], int]:
    """Delete (or with ``dry_run`` only list) what no kept run references; returns (paths, bytes).
    Works on the store behind ``root`` (a local directory or an object-store prefix)."""
    root = Path(root).resolve()
    files = store.listing(root)
    runs = kept_runs(root, files, keep)
    if not runs:
        return [], 0
    keep_dirs = referenced(root, files, runs)
    kept_ids = {r["run_id"] for r in runs}
    legacy = {x for x in LEGACY if any(rel.startswith(x + "/") for rel in files)}
    doomed = [root / x for x in sorted(legacy)]
    for rel in files:
        d = (root / rel).parent
        if Path(rel).name != SUCCESS or not d.name.startswith(("key=", "shard-")) or d in keep_dirs:
            continue
        if d.parent.name == "sweeps" or _under(rel, legacy):
            continue  # sweep tables are results, not caches
        doomed.append(d)
    doomed += [root / rel for rel in files if rel.startswith("runs/") and rel.endswith(".json")
               and Path(rel).stem.split("-", 1)[-1] not in kept_ids]
    gone = {p.relative_to(root).as_posix() for p in doomed}
    freed = sum(size for rel, size in files.items() if _under(rel, gone))
    if not dry_run:
        for p in doomed:
            store.delete(p)
        _vacuum_small_tables(root, files, kept_ids)
    return doomed, freed


def _vacuum_small_tables(root: Path, files: dict[str, int], kept_ids: set[str]) -> None:
    """Remove the data files of the small published tables that no kept run's version reads (the
    sharded tables' files are the shard directories, handled above)."""
    tables: dict[str, list[str]] = {}
    for rel in files:
        parts = rel.split("/")
        if len(parts) > 2 and parts[0] == "tables":
            tables.setdefault(parts[1], []).append("/".join(parts[2:]))
    for name, rels in tables.items():
        table = root / "tables" / name
        if not any(r.startswith("_delta_log/") for r in rels) or any(r.startswith("shard-") for r in rels):
            continue
        versions = [v for v, run in publish.run_versions(table) if run in kept_ids]
        used = publish.referenced_files(table, versions)
        for rel in rels:
            if rel.endswith(".parquet") and not rel.startswith("_delta_log") and rel not in used:
                store.delete(table / rel)
