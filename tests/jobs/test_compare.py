"""`oodlib compare` / `oodlib report` against a real SQLite MLflow store logged the way the job logs.

The store (built once per module, no Ray): experiment ``cmp`` with, oldest → newest,

* r0 — schedule ``manual``
* r1, r2, r3 — schedule ``nightly``; r3 regresses msp (avg fpr95 +0.06, avg auroc −0.015) and
  energy on the ``far`` set only (fpr95 +0.02, avg improves)
* a FAILED parent after r3 (a crashed job), which must be skipped

Each job run: a parent run (tags, acc/count metrics) and one nested child per detector logged with
``jobs.tracking.log_run`` (metrics ``{set}.{metric}``, ``avg.*``).
"""
from __future__ import annotations

import json
import sys
import time
import types

import pandas as pd
import pytest

from jobs import cli, compare

METRICS = ("fpr95", "fpr95_oodpos", "auroc", "aupr_in", "aupr_out")
# (fpr95 near, fpr95 far, auroc near, auroc far) per run and detector
VALUES = {
    "r0": {"msp": (0.50, 0.30, 0.80, 0.90), "energy": (0.50, 0.30, 0.80, 0.90)},
    "r1": {"msp": (0.30, 0.10, 0.90, 0.98), "energy": (0.40, 0.20, 0.85, 0.95)},
    "r2": {"msp": (0.28, 0.10, 0.91, 0.98), "energy": (0.41, 0.20, 0.85, 0.95)},
    "r3": {"msp": (0.40, 0.10, 0.88, 0.98), "energy": (0.38, 0.22, 0.89, 0.95)},
}
# avg = mean over the two sets
AVG = {r: {d: {"fpr95": (v[0] + v[1]) / 2, "auroc": (v[2] + v[3]) / 2} for d, v in dets.items()} for r, dets in VALUES.items()}
EXP = "cmp"


def _child_metrics(v: tuple[float, float, float, float]) -> pd.DataFrame:
    near_f, far_f, near_a, far_a = v
    per = {"near": {"fpr95": near_f, "auroc": near_a}, "far": {"fpr95": far_f, "auroc": far_a}}
    rows = []
    for s, m in per.items():
        rows += [
            {"task": "ood", "dataset": s, "metric": "fpr95", "value": m["fpr95"]},
            {"task": "ood", "dataset": s, "metric": "fpr95_oodpos", "value": m["fpr95"] / 2},
            {"task": "ood", "dataset": s, "metric": "auroc", "value": m["auroc"]},
            {"task": "ood", "dataset": s, "metric": "aupr_in", "value": m["auroc"] - 0.01},
            {"task": "ood", "dataset": s, "metric": "aupr_out", "value": m["auroc"] - 0.02},
        ]
    df = pd.DataFrame(rows)
    avg = df.groupby("metric", as_index=False)["value"].mean().assign(task="ood", dataset="avg")
    return pd.concat([df, avg[df.columns]], ignore_index=True)


def _log_job(uri: str, name: str, schedule: str, failed: bool = False, explain: bool = False) -> str:
    """One job's MLflow records, as :class:`jobs.tracking.Tracker` writes them."""
    from mlflow import MlflowClient

    from jobs import tracking

    tags = {
        "schedule": schedule, "git_sha": f"sha-{name}", "model_hash": "m1", "manifest_hash": "mf1",
        "config_hash": "c1", "oodlib_run_id": f"oid-{name}", "model": "digits-cnn",
    }
    values = VALUES.get(name, VALUES["r1"])
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, EXP)
    parent = tracking.log_run(
        client, exp_id, f"{EXP}-{name}", tags,
        params={"config": "configs/x.yaml", "model": "digits-cnn", "id_dataset": "digits", "ood_datasets": "near,far"},
        metrics={"acc.digits": 0.99, "acc.digits.val": 0.98, "count.input": 1.0 if failed else 100.0, "count.features": 100.0, "count.quarantined": 0.0},
    )
    children = [(key, {"detector": key}, _child_metrics(v)) for key, v in values.items()]
    if explain:  # a child without OOD metrics: not a detector to compare
        children.append(("explain", {"n": 4}, pd.DataFrame({"dataset": ["lrp"], "metric": ["pointing"], "value": [0.5]})))
    for key, params, rows in children:
        client.set_terminated(tracking.log_run(client, exp_id, key, {**tags, "method": key}, params, {f"{r.dataset}.{r.metric}": float(r.value) for r in rows.itertuples()}, parent_id=parent))
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking uri, {run name: parent run id}) of the store described in the module docstring."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    ids = {}
    for name, schedule in [("r0", "manual"), ("r1", "nightly"), ("r2", "nightly"), ("r3", "nightly")]:
        ids[name] = _log_job(uri, name, schedule, explain=name == "r3")
        time.sleep(0.02)  # distinct start times (ms resolution)
    ids["failed"] = _log_job(uri, "failed", "nightly", failed=True)
    mlflow.set_tracking_uri(previous)
    return uri, ids


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _blocks(text: str) -> dict[str, list[list[str]]]:
    """Table rows (split on whitespace) per ``== detector ==`` block."""
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            current = out.setdefault(line[3:-3], [])
        elif current is not None and line.strip() and not line.startswith("run "):
            current.append(line.split())
        elif not line.strip():
            current = None
    return out


def _compare(capsys, uri, tmp_path, *extra) -> tuple[int, str, str]:
    code = cli.main(["compare", "--experiment", EXP, "--tracking-uri", uri, "--png", str(tmp_path / "t.png"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the pure functions ---


def test_fetch_parents_newest_first_children_matched(store):
    uri, ids = store
    fetched = compare.fetch_runs(uri, EXP, last=5)
    assert list(fetched.parents["run_id"]) == [ids["r3"], ids["r2"], ids["r1"], ids["r0"]]  # FAILED one skipped
    assert set(fetched.children["tags.mlflow.parentRunId"]) == {ids[r] for r in ("r0", "r1", "r2", "r3")}
    assert len(fetched.children) == 4 * 2 + 1  # msp + energy per run, explain in r3
    # --last 1 fetches one extra parent (for the oldest shown run's delta)
    assert list(compare.fetch_runs(uri, EXP, last=1).parents["run_id"]) == [ids["r3"], ids["r2"]]
    assert list(compare.fetch_runs(uri, EXP, last=5, schedule="manual").parents["run_id"]) == [ids["r0"]]


def test_tidy_and_compare_values_deltas_regressions(store):
    uri, ids = store
    tidy = compare.tidy_runs(compare.fetch_runs(uri, EXP, last=3))
    assert set(tidy["method"]) == {"msp", "energy", "explain"}
    assert set(tidy[tidy.method == "msp"]["set"]) == {"avg", "near", "far"}
    assert set(tidy[tidy.method == "msp"]["metric"]) == set(METRICS)
    got = tidy.set_index(["run_id", "method", "set", "metric"])["value"]
    assert got[(ids["r3"], "msp", "avg", "fpr95")] == pytest.approx(0.25)
    assert got[(ids["r2"], "energy", "far", "auroc")] == pytest.approx(0.95)

    cmp = compare.compare_runs(tidy, threshold=0.01)
    assert set(cmp["method"]) == {"msp", "energy"} and set(cmp["set"]) == {"avg"}
    row = cmp.set_index(["run_id", "method", "metric"])
    for r, prev in [("r3", "r2"), ("r2", "r1"), ("r1", "r0")]:
        for det in ("msp", "energy"):
            for m in ("fpr95", "auroc"):
                x = row.loc[(ids[r], det, m)]
                assert x["value"] == pytest.approx(AVG[r][det][m])
                assert x["delta"] == pytest.approx(AVG[r][det][m] - AVG[prev][det][m])
    assert pd.isna(row.loc[(ids["r0"], "msp", "fpr95"), "delta"])  # nothing older
    regs = compare.newest_regressions(cmp)
    assert sorted(zip(regs["method"], regs["set"], regs["metric"])) == [("msp", "avg", "auroc"), ("msp", "avg", "fpr95")]
    assert regs.set_index("metric").loc["fpr95", "delta"] == pytest.approx(0.06)
    assert regs.set_index("metric").loc["auroc", "delta"] == pytest.approx(-0.015)
    # r1 vs r0 improved everything: no flags there
    assert not cmp[cmp.run_id == ids["r1"]]["regression"].any()

    per_set = compare.newest_regressions(compare.compare_runs(tidy, threshold=0.01, per_set=True))
    assert sorted(zip(per_set["method"], per_set["set"], per_set["metric"])) == [
        ("energy", "far", "fpr95"), ("msp", "avg", "auroc"), ("msp", "avg", "fpr95"), ("msp", "near", "auroc"), ("msp", "near", "fpr95"),
    ]


def test_compare_delta_only_vs_the_run_right_before():
    """A detector absent from the previous run gets no delta (not one vs an older run)."""
    t = pd.Timestamp("2026-01-01", tz="UTC")
    tidy = pd.DataFrame([
        {"run_id": f"run{o}", "start_time": t, "git_sha": "s", "order": o, "method": m, "set": "avg", "metric": "fpr95", "value": v}
        for o, m, v in [(0, "msp", 0.5), (2, "msp", 0.1), (0, "energy", 0.3), (1, "energy", 0.2), (1, "knn", 0.2)]
    ])
    cmp = compare.compare_runs(tidy, 0.01).set_index(["method", "order"])
    assert pd.isna(cmp.loc[("msp", 0), "delta"]) and not cmp.loc[("msp", 0), "regression"]
    assert cmp.loc[("energy", 0), "delta"] == pytest.approx(0.1) and cmp.loc[("energy", 0), "regression"]
    assert "not in the newest run (in the previous one): knn" in compare.render_table(compare.compare_runs(tidy, 0.01), 5, 0.01)


def test_tracking_uri_precedence(monkeypatch):
    assert compare.resolve_tracking_uri(None) == "sqlite:///outputs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert compare.resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert compare.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


# --- the command ---


def test_compare_table_and_exit_codes(store, capsys, tmp_path):
    uri, ids = store
    code, out, _ = _compare(capsys, uri, tmp_path, "--last", "3")
    assert code == 0  # regressions are reported, but no gate without --fail-on-regression
    blocks = _blocks(out)
    assert set(blocks) == {"msp", "energy"}
    msp = blocks["msp"]
    assert [r[0] for r in msp] == [ids["r3"][:8], ids["r2"][:8], ids["r1"][:8]]  # newest first, 3 runs
    assert msp[0][3:10] == ["sha-r3", "avg", "0.2500", "+0.0600", "0.9300", "-0.0150", "REGRESSION"]
    assert msp[0][10] == "fpr95,auroc"
    assert msp[1][3:9] == ["sha-r2", "avg", "0.1900", "-0.0100", "0.9450", "+0.0050"] and len(msp[1]) == 9
    assert msp[2][5:9] == ["0.2000", "-0.2000", "0.9400", "+0.0900"]  # r1 vs r0 (outside the window)
    energy = blocks["energy"]
    assert energy[0][5:9] == ["0.3000", "-0.0050", "0.9200", "+0.0200"] and len(energy[0]) == 9
    assert energy[1][5:9] == ["0.3050", "+0.0050", "0.9000", "+0.0000"] and len(energy[1]) == 9  # within threshold
    assert "msp avg.fpr95: 0.1900 → 0.2500 (+0.0600)" in out
    assert "msp avg.auroc: 0.9450 → 0.9300 (-0.0150)" in out
    assert "explain" not in blocks

    code, out, _ = _compare(capsys, uri, tmp_path, "--fail-on-regression")
    assert code == 1
    # a looser threshold: the avg changes are no regression any more
    code, out, _ = _compare(capsys, uri, tmp_path, "--fail-on-regression", "--threshold", "0.1")
    assert code == 0 and "no regressions" in out


def test_compare_per_set(store, capsys, tmp_path):
    uri, ids = store
    code, out, _ = _compare(capsys, uri, tmp_path, "--last", "2", "--per-set")
    assert code == 0
    msp = _blocks(out)["msp"]
    newest = {r[4]: r for r in msp if r[0] == ids["r3"][:8]}
    assert list(newest) == ["avg", "far", "near"]
    assert newest["near"][5:11] == ["0.4000", "+0.1200", "0.8800", "-0.0300", "REGRESSION", "fpr95,auroc"]
    assert newest["far"][5:9] == ["0.1000", "+0.0000", "0.9800", "+0.0000"] and len(newest["far"]) == 9
    energy = {r[4]: r for r in _blocks(out)["energy"] if r[0] == ids["r3"][:8]}
    assert energy["far"][5:11] == ["0.2200", "+0.0200", "0.9500", "+0.0000", "REGRESSION", "fpr95"]
    assert len([r for r in msp if r[0] == ids["r2"][:8]]) == 3 and len(msp) == 6
    # the per-set gate: msp near fpr95 +0.12 > 0.1 although its avg (+0.06) is not
    assert _compare(capsys, uri, tmp_path, "--threshold", "0.1", "--fail-on-regression")[0] == 0
    assert _compare(capsys, uri, tmp_path, "--threshold", "0.1", "--fail-on-regression", "--per-set")[0] == 1


def test_compare_schedule_filter(store, capsys, tmp_path):
    uri, ids = store
    code, out, _ = _compare(capsys, uri, tmp_path, "--schedule", "nightly")
    msp = _blocks(out)["msp"]
    assert code == 0 and [r[0] for r in msp] == [ids[r][:8] for r in ("r3", "r2", "r1")]
    assert msp[2][6] == "—" and msp[2][8] == "—"  # r1 is the oldest nightly: no previous run
    code, out, err = _compare(capsys, uri, tmp_path, "--schedule", "weekly")
    assert code == 2 and "no runs" in err and "'weekly'" in err


def test_compare_png(store, capsys, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.chdir(tmp_path)
    code = cli.main(["compare", "--experiment", EXP, "--tracking-uri", uri])
    assert code == 0
    png = tmp_path / f"compare-{EXP}.png"  # default path: ./compare-<experiment>.png
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert f"trend plot: compare-{EXP}.png" in capsys.readouterr().out
    other = tmp_path / "sub" / "trend.png"
    assert cli.main(["compare", "--experiment", EXP, "--tracking-uri", uri, "--png", str(other)]) == 0
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_missing_experiment_or_store(store, capsys, tmp_path):
    uri, _ = store
    code, out, err = _compare(capsys, uri, tmp_path, "--experiment", "nope")
    assert code == 2 and "experiment 'nope' not found" in err and EXP in err
    assert not (tmp_path / "t.png").exists()
    missing = tmp_path / "none" / "mlflow.db"
    code, _, err = _compare(capsys, f"sqlite:///{missing}", tmp_path)
    assert code == 2 and "does not exist" in err and not missing.exists()  # no empty store created
    assert cli.main(["compare", "--experiment", EXP, "--tracking-uri", uri, "--last", "0"]) == 2


# --- oodlib report ---


def test_report_prints_last_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_dir = tmp_path / "out" / "exp" / "metrics" / "key=abc"
    eval_dir.mkdir(parents=True)
    (eval_dir / "results.md").write_text("| OOD set | detector | fpr95 |\n|---|---|---:|\n| avg | msp | 25.00 |\n")
    summary = {
        "run_id": "aa5ed4bcfb0d", "experiment": "exp", "config": "configs/x.yaml", "config_hash": "0c8b49",
        "mlflow_run_id": "435fcc33", "tracking_uri": "sqlite:///out/mlflow.db", "manifest": "m.parquet", "manifest_hash": "544c",
        "model_hash": "c06c", "stages": {"embed": "out/exp/embed/key=1", "evaluate": "out/exp/metrics/key=abc"},
        "reused": {"embed": True, "evaluate": False}, "seconds": {"embed": 0.0, "evaluate": 0.82},
        "images": {"input": 6065, "features": 6060, "quarantined": 5}, "total_seconds": 7.43,
    }
    (tmp_path / "out" / "exp" / "last_run.json").write_text(json.dumps(summary))
    assert cli.main(["report", "--output", "out", "--experiment", "exp"]) == 0
    out = capsys.readouterr().out
    assert "run id:        aa5ed4bcfb0d" in out
    assert "MLflow run:    435fcc33 in sqlite:///out/mlflow.db" in out
    assert "config:        configs/x.yaml (hash 0c8b49)" in out
    assert "6065 in, 6060 embedded, 5 quarantined" in out
    assert any(line.split()[:3] == ["evaluate", "computed", "0.82"] for line in out.splitlines())
    assert "| avg | msp | 25.00 |" in out
    # from another directory, with --output absolute: the stage path is found relative to it
    monkeypatch.chdir(tmp_path / "out")
    assert cli.main(["report", "--output", str(tmp_path / "out"), "--experiment", "exp"]) == 0
    assert "| avg | msp | 25.00 |" in capsys.readouterr().out
    # no such experiment
    assert cli.main(["report", "--output", str(tmp_path / "out"), "--experiment", "nope"]) == 2
    assert "last_run.json" in capsys.readouterr().err


def test_cli_run_forwards_flags(monkeypatch, tmp_path):
    seen = {}
    fake = types.ModuleType("jobs.pipeline")  # stands in for the job (no torch/Ray import here)
    fake.run = lambda cfg, schedule, config_path, overrides: seen.update(cfg=cfg, schedule=schedule, config=config_path, sets=overrides)
    monkeypatch.setitem(sys.modules, "jobs.pipeline", fake)
    monkeypatch.setattr("jobs.pipeline", fake, raising=False)
    (tmp_path / "c.yaml").write_text("experiment: e\n")
    config = str(tmp_path / "c.yaml")
    assert cli.main(["run", "--config", config, "--set", "embed.batch_size=7", "--set", "data.seed=3", "--schedule", "nightly"]) == 0
    assert seen["cfg"].embed.batch_size == 7 and seen["cfg"].data.seed == 3
    assert seen["schedule"] == "nightly" and seen["config"] == config
    assert cli.main(["run", "--config", config, "--set", "embed.batch_size=0"]) == 2  # a bad override: exit 2
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
