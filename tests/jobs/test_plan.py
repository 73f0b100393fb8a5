"""``oodlib plan``: row counts without the data, the refusal over the driver-memory limit (exit 2,
before any cluster resource), and a time estimate within 2× of a measured small digits run."""
from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import cli, pipeline, plan
from jobs.config import parse_config
from jobs.extras import EXTRAS

FOLDERS = {
    "experiment": "big",
    "data": {"source": "folders", "id_dataset": "inet", "ood_datasets": ["far"],
             "sets": [{"dataset": "inet", "split": "train", "root": "/nowhere/train", "rows": 1281167},
                      {"dataset": "inet", "split": "test", "root": "/nowhere/test", "rows": 50000},
                      {"dataset": "far", "split": "test", "root": "/nowhere/far", "ood": True, "rows": 40000}]},
    "model": {"name": "standin-imagenet", "weights": "/nowhere/weights.safetensors"},
    "embed": {"batch_size": 64, "num_actors": 8, "num_shards": 1024},
    "detectors": ["msp", "odin", {"name": "knn", "params": {"k": 50, "alpha": 0.01}}, "mahalanobis",
                  {"name": "vim", "params": {"dim": 1000}, "fit_fraction": 0.1}],
    "mlflow": {"enabled": False},
}


def write(tmp_path, raw) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_plan_without_the_data(tmp_path, capsys):
    assert cli.main(["plan", "--config", write(tmp_path, FOLDERS)]) == 0
    out = capsys.readouterr().out
    assert "1,371,167 rows (the rows: of data.sets)" in out and "calibrated on cpu" in out
    assert "untrained weights" in out  # the weights file is elsewhere: the architecture is timed
    assert "knn bank 12,812 rows drawn in the workers" in out and "vim loads 128,117 train rows" in out
    # ODIN is computed on the scored rows only: ID test + OOD, not the 1.28M train rows
    assert any(line.split()[:2] == ["odin", "90,000"] for line in out.splitlines())
    # the counts of a manifest instead of the config's
    rows = pa.table({"dataset": ["inet"] * 5 + ["far"] * 2, "split": ["train", "train", "test", "test", "test", "test", "test"]})
    pq.write_table(rows, tmp_path / "rows.parquet")
    assert cli.main(["plan", "--config", write(tmp_path, FOLDERS), "--manifest", str(tmp_path / "rows.parquet")]) == 0
    assert "7 rows (manifest" in capsys.readouterr().out
    # image sets without rows: cannot plan, exit 2 naming what is missing
    raw = {**FOLDERS, "data": {**FOLDERS["data"], "sets": [{**s, "rows": None} for s in FOLDERS["data"]["sets"]]}}
    assert cli.main(["plan", "--config", write(tmp_path, raw)]) == 2
    assert "rows:" in capsys.readouterr().err


def test_memory_refusal_exits_2(tmp_path, capsys):
    path = write(tmp_path, FOLDERS)
    assert cli.main(["plan", "--config", path, "--set", "runtime.max_driver_memory_gb=1"]) == 2
    err = capsys.readouterr().err
    assert "runtime.max_driver_memory_gb" in err and "over the limit of 1 GiB" in err
    # a run refuses too, before any stage (and before Ray)
    raw = {**FOLDERS, "output": str(tmp_path / "out"), "data": {"source": "digits", "limit_per_split": 20},
           "model": {"name": "digits-cnn"}, "runtime": {"max_driver_memory_gb": 0.01}}
    assert cli.main(["run", "--config", write(tmp_path, raw)]) == 2
    assert "over the limit of 0.01 GiB" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "out" / "big" / "manifest").exists()


def test_extras_declare_rows_and_passes():
    from jobs.config.base import without_path_checks

    with without_path_checks():
        cfg = parse_config({**FOLDERS, "errors": {"enabled": True, "fit_fraction": 0.1}})
    counts = {("inet", "train"): 1000, ("inet", "test"): 100, ("far", "test"): 50}
    assert EXTRAS["odin"].rows(cfg).expected(counts) == 150
    assert EXTRAS["conductance"].rows(cfg).expected(counts) == 100 + 100  # errors.fit_fraction of train + ID test
    assert EXTRAS["odin"].passes({}, cfg) == (2.0, 1.0)


@pytest.mark.slow
def test_time_estimate_within_2x_of_a_small_digits_run(tmp_path):
    import ray

    cfg = parse_config({
        "experiment": "t", "output": str(tmp_path / "out"), "data": {"source": "digits", "limit_per_split": 40},
        "embed": {"batch_size": 32, "num_actors": 1, "num_shards": 4},
        "detectors": ["msp", "odin", {"name": "knn", "params": {"k": 5}}, "mahalanobis"], "mlflow": {"enabled": False},
    })
    assert not ray.is_initialized()  # the plan counts Ray's start, as the run will
    estimate = plan.make_plan(cfg, pipeline.load_job_model(cfg))
    try:
        summary = pipeline.run(cfg)
    finally:
        ray.shutdown()
    stages = [s.name for s in estimate.stages]
    assert stages == ["embed", "fit", "score", "evaluate"]
    assert sum(estimate.counts.values()) == summary["images"]["input"] == 240
    measured = sum(summary["seconds"][s] for s in stages)
    planned = sum(s.seconds for s in estimate.stages)
    print(f"planned {planned:.1f} s, measured {measured:.1f} s ({ {s: summary['seconds'][s] for s in stages} })")
    assert measured / 2 <= planned <= 2 * measured
