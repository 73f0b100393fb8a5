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
import os
import shutil
from pathlib import Path

from jobs import publish
from jobs.shards import index_shards
from jobs.storage import SUCCESS

#: directories of earlier output layouts (before the stage redesign): nothing reads them
LEGACY = ("fitted", "metrics", "scores", "gaussianized", "quarantine", "embed/shards")


def kept_runs(root: Path, keep: int) -> list[dict]:
    """The run records of the newest ``keep`` runs."""
    records = sorted((root / "runs").glob("*.json"), reverse=True) if (root / "runs").is_dir() else []
    return [json.loads(p.read_text()) for p in records[:keep]]


def referenced(root: Path, runs: list[dict]) -> set[Path]:
    """Directories the kept runs use: their stage directories and the shards those list."""
    out: set[Path] = set()
    for run in runs:
        for path in run.get("stages", {}).values():
            p = Path(path)
            p = p if p.is_absolute() else Path.cwd() / p
            out.add(p.resolve())
            if (p / "index.json").is_file():
                out |= {s.resolve() for s in index_shards(p)}
    return out


def collect(root: Path, keep: int, dry_run: bool = False) -> tuple[list[Path], int]:
    """Delete (or with ``dry_run`` only list) what no kept run references; returns (paths, bytes)."""
    root = Path(root).resolve()
    runs = kept_runs(root, keep)
    if not runs:
        return [], 0
    keep_dirs = referenced(root, runs)
    kept_ids = {r["run_id"] for r in runs}
    doomed = [root / legacy for legacy in LEGACY if (root / legacy).is_dir()]
    for success in root.rglob(SUCCESS):
        d = success.parent.resolve()
        if (d.name.startswith("key=") or d.name.startswith("shard-")) and d not in keep_dirs and not any(d.is_relative_to(x) for x in doomed):
            if d.parent.name == "sweeps":
                continue  # sweep tables are results, not caches
            doomed.append(d)
    doomed += [p for p in (root / "runs").glob("*.json") if p.stem.split("-", 1)[-1] not in kept_ids]
    freed = sum(_size(p) for p in doomed)
    if not dry_run:
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        _vacuum_small_tables(root, kept_ids)
    return doomed, freed


def _vacuum_small_tables(root: Path, kept_ids: set[str]) -> None:
    """Remove the data files of the small published tables that no kept run's version reads (the
    sharded tables' files are the shard directories, handled above)."""
    tables = root / "tables"
    if not tables.is_dir():
        return
    for table in tables.iterdir():
        if not (table / "_delta_log").is_dir() or any(table.glob("shard-*")):
            continue
        versions = [v for v, run in publish.run_versions(table) if run in kept_ids]
        used = publish.referenced_files(table, versions)
        for f in table.rglob("*.parquet"):
            rel = f.relative_to(table).as_posix()
            if not rel.startswith("_delta_log") and rel not in used:
                f.unlink()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
