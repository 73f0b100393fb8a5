"""Published Delta tables read by DuckDB and Polars: the newest run's rows exactly once, earlier
runs by version; `oodlib gc` frees superseded shards and the next run still reuses everything."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import cli, pipeline
from jobs.config import parse_config
from jobs.publish import duckdb_connection
from tests.jobs.test_pipeline import ray_local  # noqa: F401  (the module's Ray fixture)

pytestmark = pytest.mark.slow


def config(tmp_path: Path, manifest: Path) -> dict:
    return {
        "experiment": "p", "output": str(tmp_path / "out"),
        "data": {"source": "manifest", "manifest": str(manifest), "ood_datasets": ["noise"]},
        "embed": {"batch_size": 32, "num_actors": 1, "num_shards": 4},
        "detectors": ["msp", "energy"],
        "mlflow": {"enabled": False},
    }


def test_three_runs_newest_rows_once_versions_and_gc(tmp_path, ray_local, digits_sets):  # noqa: F811
    import polars as pl
    from deltalake import DeltaTable

    from oodlib.data.digits import ImageSet
    from oodlib.data.manifest import manifest_from_image_sets

    base = [digits_sets[k] for k in [("digits", "train"), ("digits", "test"), ("noise", "test")]]
    base = [ImageSet(s.dataset, s.split, s.images[:50], s.labels[:50], s.image_ids[:50]) for s in base]
    manifest = tmp_path / "m.parquet"
    pq.write_table(manifest_from_image_sets(base), manifest)
    raw = config(tmp_path, manifest)
    first = pipeline.run(parse_config(raw))
    second = pipeline.run(parse_config(raw))  # unchanged: everything reused, a new table version all the same
    near = digits_sets[("digits-near", "test")]
    new = ImageSet("noise", "test", near.images[:7], np.full(7, -1), [f"noise/test/new-{i}" for i in range(7)])
    pq.write_table(manifest_from_image_sets([*base, new]), manifest)
    third = pipeline.run(parse_config(raw))
    assert all(second["reused"].values()) and not third["reused"]["embed"]

    tables = Path(third["tables"]["scores"]["path"]).parent
    con = duckdb_connection()
    n_new = 150 + 7
    # (the first run's rows, the newest run's): features has every image, scores all but the 50 ID-train ones
    for name, (n_first, n_newest) in {"scores": (100, 100 + 7), "features": (150, n_new)}.items():
        path = tables / name
        assert DeltaTable(str(path)).version() == 2 and third["tables"][name]["version"] == 2
        ids = con.sql(f"select image_id from delta_scan('{path}')").fetchall()
        assert len(ids) == len(set(ids)) == n_newest  # the newest run's rows, exactly once
        assert pl.scan_delta(str(path)).select(pl.len()).collect().item() == n_newest
        assert pl.scan_delta(str(path), version=0).select(pl.len()).collect().item() == n_first  # time travel: the first run
        meta = [h.get("oodlib_run_id") for h in DeltaTable(str(path)).history()]
        assert meta == [third["run_id"], second["run_id"], first["run_id"]]
    # the published scores equal the stage's own scores (Polars reads the partition column too)
    scores = pl.scan_delta(str(tables / "scores")).collect().to_pandas().set_index("image_id")
    assert set(scores.dataset) == {"digits", "noise"} and scores.loc["noise/test/new-3", "label"] == -1
    metrics = con.sql(f"select * from delta_scan('{tables / 'metrics'}')").df()
    assert ((metrics.method == "msp") & (metrics.metric == "auroc") & (metrics.dataset == "noise")).sum() == 1

    # gc keeps the newest run's outputs only; the next run reuses every stage
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    shard_dirs = set((tables / "features").glob("shard-*"))
    assert cli.main(["gc", "--config", str(path), "--keep-runs", "1"]) == 0
    left = set((tables / "features").glob("shard-*"))
    assert left < shard_dirs  # the superseded shards were freed
    assert len(list((tables.parent / "runs").glob("*.json"))) == 1
    fourth = pipeline.run(parse_config(raw))
    assert all(fourth["reused"].values())
    assert pl.scan_delta(str(tables / "features")).select(pl.len()).collect().item() == n_new
    assert json.loads((tables.parent / "last_run.json").read_text())["run_id"] == fourth["run_id"]
