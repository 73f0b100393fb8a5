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
    assert "knn bank 12,812 rows drawn in the workers" in out and "vim fits on 128,117 train rows in a task" in out
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


#: a calibration with fixed rates (seconds), so that the estimates are exact functions of the config
RATES = {"fwd_driver": 2e-4, "mlp_step": 2.5e-3, "metric_a": 1.5e-4, "metric_b": 2e-7, "logreg_fit": 0.01,
         "graph:linear": 1e-6, "graph:mlp": 8e-6, "graph:gcn": 1e-5,
         **{f"attr:{m}": 2e-3 for m in ("rap", "ae", "lrp-eps", "lrp-a1b0", "gradient", "input-x-gradient", "gradcam")},
         "attr:integrated-gradients": 0.02}
DIGITS = "configs/digits.yaml"


@pytest.fixture(scope="module")
def digits_rows():
    from jobs.config import load_config

    counts, _, batches = plan.row_counts(load_config(DIGITS, {"output": "/tmp/unused"}))
    return counts, batches


def fixed_plan(rows, **overrides) -> plan.Plan:
    from jobs.calibrate import Calibration
    from jobs.config import load_config

    cfg = load_config(DIGITS, {"output": "/tmp/unused", **overrides})
    cal = Calibration("cpu", 16, 64, 8, decode=1e-4, forward=2.5e-4, widths={"conductance": 34, "lcr": 102},
                      flops=1e10, cpus=2, rates=dict(RATES))
    return plan.estimate(cfg, rows[0], cal, "test", rows[1])


def test_every_stage_is_estimated(digits_rows):
    from jobs.config import load_config

    p = fixed_plan(digits_rows)
    expected = [s.name for s in pipeline.plan(load_config(DIGITS, {"output": "/tmp/unused"}))]
    assert [s.name for s in p.stages] == expected  # every stage the run has, in its order
    assert all(s.seconds > 0 and s.work for s in p.stages)
    assert p.batches == {"prod": [120, 120, 120]}  # the three nights: VERDICTS tests drift per batch
    assert "3 batches × 401 × 5 C2ST fits" in p.stage("verdicts").work
    # stages switched off are not charged
    off = fixed_plan(digits_rows, **{"errors.enabled": False, "graph.enabled": False, "explain.enabled": False})
    assert [s.name for s in off.stages] == ["manifest", "embed", "fit", "score", "evaluate", "verdicts"]
    assert off.seconds < p.seconds / 2


@pytest.mark.parametrize("stage, small, big", [
    ("mutants", {"errors.mutants.n_accepted": 100}, {"errors.mutants.n_accepted": 200}),
    ("errors", {"errors.detector_epochs": 60, "errors.n_bootstrap": 200}, {"errors.detector_epochs": 120, "errors.n_bootstrap": 400}),
    ("verdicts", {"verdicts.drift_permutations": 400}, {"verdicts.drift_permutations": 800}),
    ("graph", {"graph.epochs": 200}, {"graph.epochs": 400}),
    ("explain", {"explain.localization_images": 200, "explain.counts": {"wrong": 6, "uncertain": 6, "risky_ood": 6, "random": 6},
                 "verdicts.top_k": 8},
     {"explain.localization_images": 400, "explain.counts": {"wrong": 12, "uncertain": 12, "risky_ood": 12, "random": 12},
      "verdicts.top_k": 16}),
    ("evaluate", {"detectors": [{"name": "knn", "params": {"k": k}, "column": f"knn{k}"} for k in range(1, 17)],
                  "verdicts.primary_detector": "knn1"},
     {"detectors": [{"name": "knn", "params": {"k": k}, "column": f"knn{k}"} for k in range(1, 33)],
      "verdicts.primary_detector": "knn1"}),
])
def test_stage_estimate_scales_with_its_work(digits_rows, stage, small, big):
    """Doubling what a stage is configured to do about doubles its estimate (its fixed costs stay)."""
    a, b = fixed_plan(digits_rows, **small).stage(stage), fixed_plan(digits_rows, **big).stage(stage)
    assert 1.7 <= b.seconds / a.seconds <= 2.0, (stage, a.seconds, b.seconds)
    assert a.work != b.work  # the stage line says what it charges


def test_explain_and_graph_charge_per_method_and_ablation(digits_rows):
    p = fixed_plan(digits_rows, **{"explain.localization": False})
    two = fixed_plan(digits_rows, **{"explain.localization": False, "explain.methods": ["rap", "gradient"]})
    # 48 images × 8 methods vs × 2 (the Ray task's start stays)
    assert p.stage("explain").work == "48 images × 8 methods" and two.stage("explain").seconds < p.stage("explain").seconds / 2
    one = fixed_plan(digits_rows, **{"graph.ablations": ["gcn"]})
    assert one.stage("graph").seconds < p.stage("graph").seconds / 2


def test_graph_ablation_kinds_match_the_detector():
    from jobs.plan_stages import ABLATION_KINDS
    from oodlib.longtail.detector import ABLATIONS

    assert ABLATION_KINDS == {name: kind for name, (_, kind) in ABLATIONS.items()}


def plan_and_run(cfg):
    """(the plan, the run's summary) of ``cfg``, planned before Ray starts (the plan counts Ray's
    start, as the run will)."""
    import ray

    assert not ray.is_initialized()
    estimate = plan.make_plan(cfg, pipeline.load_job_model(cfg))
    try:
        return estimate, pipeline.run(cfg)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_time_estimate_within_2x_of_a_small_digits_run(tmp_path):
    cfg = parse_config({
        "experiment": "t", "output": str(tmp_path / "out"), "data": {"source": "digits", "limit_per_split": 40},
        "embed": {"batch_size": 32, "num_actors": 1, "num_shards": 4},
        "detectors": ["msp", "odin", {"name": "knn", "params": {"k": 5}}, "mahalanobis"], "mlflow": {"enabled": False},
    })
    estimate, summary = plan_and_run(cfg)
    stages = [s.name for s in estimate.stages]
    assert stages == ["manifest", "embed", "fit", "score", "evaluate"]
    assert sum(estimate.counts.values()) == summary["images"]["input"] == 240
    measured = sum(summary["seconds"][s] for s in stages)
    planned = sum(s.seconds for s in estimate.stages)
    print(f"planned {planned:.1f} s, measured {measured:.1f} s ({ {s: summary['seconds'][s] for s in stages} })")
    assert measured / 2 <= planned <= 2 * measured


#: the smoke profile made smaller still (every stage on, each with a little work): ~40 s on 2 cores
EVERY_STAGE = {"graph.epochs": 10, "explain.localization_images": 12,
               "verdicts.alpha": 0.1, "verdicts.drift_permutations": 40, "mlflow.enabled": False}


@pytest.mark.slow
def test_time_estimate_within_2x_of_a_run_with_every_stage(tmp_path):
    """The plan's total against the stage seconds of a run of every stage (the smoke profile, smaller)."""
    from jobs.config import load_config
    from jobs.config.overrides import parse_overrides, profile_sets

    overrides = {**parse_overrides(profile_sets("smoke")), **EVERY_STAGE, "output": str(tmp_path / "out")}
    cfg = load_config(DIGITS, overrides)
    estimate, summary = plan_and_run(cfg)
    stages = [s.name for s in estimate.stages]
    assert stages == list(summary["seconds"])  # every stage of the run is estimated, in its order
    assert sum(estimate.counts.values()) == summary["images"]["input"]
    for s in estimate.stages:
        print(f"{s.name:<12} planned {s.seconds:6.1f} s, measured {summary['seconds'][s.name]:6.1f} s  ({s.work})")
    measured, planned = sum(summary["seconds"].values()), estimate.seconds
    print(f"planned {planned:.1f} s, measured {measured:.1f} s")
    assert measured / 2 <= planned <= 2 * measured
