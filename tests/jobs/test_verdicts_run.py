"""The nightly verdict end to end on a small digits job with three simulated nights (issue #15):
one verdict per input image, flags that follow from the published tables, a calibrated threshold,
rising flag rates with an alert on the last night, the report, MLflow series and ``oodlib monitor``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs import cli, pipeline
from jobs.config import parse_config

pytestmark = pytest.mark.slow
NIGHTS = ["2026-11-29", "2026-11-30", "2026-12-01"]


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("verdicts")
    raw = {
        "experiment": "v", "output": str(tmp / "out"),
        "data": {"source": "digits", "limit_per_split": 60, "ood_datasets": ["digits-near", "noise"], "extra_datasets": ["digits-c"],
                 "incoming_datasets": ["prod"]},
        "embed": {"batch_size": 64, "num_actors": 1, "num_shards": 4},
        "detectors": ["msp", "energy", {"name": "knn", "params": {"k": 5}}],
        "errors": {"enabled": True, "n_steps": 4, "mutants": {"operator": "NAI", "rate": 0.02, "n_accepted": 4, "max_tries": 200},
                   "extra_datasets": ["digits-c"], "detector_epochs": 3},
        "explain": {"enabled": True, "methods": ["gradient"], "localization": False,
                    "counts": {"wrong": 1, "uncertain": 1, "risky_ood": 1, "random": 1}},
        "verdicts": {"enabled": True, "n_boot": 200, "top_k": 3, "primary_detector": "knn", "primary_risk": "conductance"},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    (tmp / "job.yaml").write_text(yaml.safe_dump(raw))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = pipeline.run(parse_config(raw))
        second = pipeline.run(parse_config(raw))
    finally:
        ray.shutdown()
    return tmp, first, second


def published(summary: dict, name: str) -> pd.DataFrame:
    from deltalake import DeltaTable

    return DeltaTable(summary["tables"][name]["path"]).to_pandas()


def test_one_verdict_per_input_image(nightly):
    _, first, _ = nightly
    verdicts = published(first, "verdicts")
    assert len(verdicts) == first["images"]["input"] and verdicts.image_id.is_unique
    assert set(verdicts.verdict) <= {"ok", "ood", "likely-wrong", "ood+likely-wrong", "quarantined", "unscored"}
    # SCORE scores the ID val/test, OOD, extra and incoming rows; the ID train split (fitting data) is "unscored"
    scores = published(first, "scores")
    unscored = verdicts[verdicts.verdict == "unscored"]
    assert (unscored.dataset == "digits").all() and (unscored.split == "train").all() and len(unscored) == 60
    assert not unscored.flagged.any() and unscored.score.isna().all()
    assert set(scores.image_id) == set(verdicts.image_id[~verdicts.verdict.isin(["unscored", "quarantined"])])
    assert not ((scores.dataset == "digits") & (scores.split == "train")).any()
    prod = verdicts[verdicts.dataset == "prod"]
    assert sorted(prod.batch.unique()) == NIGHTS and (prod.groupby("batch").size() == 60).all()
    flagged = verdicts[verdicts.flagged]
    assert (flagged.reasons.map(len) > 0).all() and (verdicts[~verdicts.flagged].reasons.map(len) == 0).all()
    assert (flagged.why.str.len() > 0).all()
    codes = {c for r in verdicts.reasons for c in r}
    assert codes <= {"ood:knn", "risk:conductance"}
    # the top flagged images of each night point at their relevance maps
    pointed = verdicts[verdicts.relevance_maps.notna()]
    maps = pd.read_parquet(pointed.relevance_maps.iloc[0])
    assert set(pointed.image_id) == set(maps.image_id)
    top = maps[maps.reason.str.startswith("flagged-")]
    assert top.groupby("reason").image_id.nunique().to_dict() == {f"flagged-{n}": 3 for n in NIGHTS}
    assert verdicts.set_index("image_id").loc[top.image_id, "flagged"].all()


def test_flags_follow_from_the_published_tables(nightly):
    _, first, _ = nightly
    verdicts = published(first, "verdicts").set_index("image_id")
    scores = published(first, "scores").set_index("image_id")
    risks = published(first, "risks").set_index("image_id")
    thresholds = published(first, "thresholds").set_index(["kind", "name"])
    primary = json.loads((Path(first["stages"]["verdicts"]) / "primary.json").read_text())
    t_ood = thresholds.loc[("ood", primary["ood"]), "threshold"]
    t_risk = thresholds.loc[("risk", primary["risk"]), "threshold"]
    ids = scores.index
    ood = scores[f"score_{primary['ood']}"].to_numpy(np.float64) < t_ood
    risk = risks[f"risk_{primary['risk']}"].reindex(ids).to_numpy(np.float64)
    wrong = np.nan_to_num(risk, nan=-np.inf) >= t_risk
    np.testing.assert_array_equal(verdicts.loc[ids, "is_ood"], ood)
    np.testing.assert_array_equal(verdicts.loc[ids, "likely_wrong"], wrong)
    np.testing.assert_array_equal(verdicts.loc[ids, "flagged"], ood | wrong)
    assert risks.loc[risks.dataset == "prod", "part"].eq("incoming").all()  # tonight's images are never fitted on


def test_threshold_keeps_the_target_share_of_id_val(nightly):
    _, first, _ = nightly
    scores = published(first, "scores")
    thresholds = published(first, "thresholds").set_index(["kind", "name"])
    for name in ("msp", "energy", "knn"):
        val = scores[(scores.dataset == "digits") & (scores.split == "val")][f"score_{name}"].to_numpy(np.float64)
        row = thresholds.loc[("ood", name)]
        t = row.threshold
        assert (val >= t).mean() >= 0.95 and (val >= np.min(val[val > t], initial=np.inf)).mean() < 0.95  # the largest such t
        test = scores[(scores.dataset == "digits") & (scores.split == "test")][f"score_{name}"].to_numpy(np.float64)
        assert row.id_test_flag_rate == (test < t).mean() and row.n_new == len(test)
        assert row.new_flag_rate_lo <= row.id_test_flag_rate <= row.new_flag_rate_hi  # the predictive interval holds it
        assert row.new_flag_rate_lo <= 0.05 <= row.new_flag_rate_hi


def test_rates_rise_and_the_last_night_alerts(nightly, tmp_path):
    tmp, first, second = nightly
    batches = published(second, "batches")
    assert list(batches.batch) == NIGHTS and set(batches.dataset) == {"prod"}  # run 2 replaced run 1's rows
    assert set(batches.oodlib_run_id) == {second["run_id"]}
    rates = batches.rate.to_numpy()
    assert rates[0] < rates[1] < rates[2]
    assert first["alert"]["fire"] and first["alert"]["datasets"]["prod"]["batch"] == NIGHTS[-1]
    from jobs.report import decisions

    assert not decisions(batches, 0.02, 0.01)["prod"][0].fire  # the 5% night does not alert
    alert = json.loads((Path(first["report_dir"]) / "alert.json").read_text())
    assert alert == json.loads(json.dumps(first["alert"]))
    last = alert["datasets"]["prod"]
    # the rate rule as stated: the batch's lower Wilson bound above the ID rate's upper bound + margin
    assert last["rate_fires"] == (last["lo"] > batches.expected_hi.iloc[-1] + 0.02)
    assert last["fire"] == (last["rate_fires"] or last["drift_fires"]) and last["exit_code"] == 1
    # the report: one file, the alert headline, the top flagged images with their relevance maps
    html = Path(first["reports"][0]).read_text()
    assert "ALERT" in html and NIGHTS[-1] in html and "<script" not in html
    assert html.count('class="item"') == 3 * len(NIGHTS) and html.count("relevance map of") == 3 * len(NIGHTS)
    # oodlib monitor re-decides from the published table and exits 1 on the alert
    code = cli.main(["monitor", "--config", str(tmp / "job.yaml"), "--json"])
    assert code == 1


def test_mlflow_has_the_rate_per_night_and_the_report(nightly):
    from mlflow import MlflowClient

    _, first, _ = nightly
    client = MlflowClient(first["tracking_uri"])
    history = client.get_metric_history(first["mlflow_run_id"], "batch.prod.rate")
    assert sorted(m.step for m in history) == [20261129, 20261130, 20261201]
    batches = published(first, "batches").set_index("batch")
    for m in history:
        day = f"{str(m.step)[:4]}-{str(m.step)[4:6]}-{str(m.step)[6:]}"
        assert m.value == pytest.approx(batches.loc[day, "rate"])
    names = {a.path for a in client.list_artifacts(first["mlflow_run_id"])}
    assert {"alert.json", "report-prod.html"} <= names


def test_unjudged_rows_quarantined_and_unscored(tmp_path):
    """The verdict rows no detector judged, built by hand: a quarantined image (flagged, the reason,
    its batch from the manifest) and the usable images nothing scored (``unscored``, not flagged)."""
    from types import SimpleNamespace

    import pyarrow as pa

    from jobs import storage
    from jobs.stages.manifest import ManifestResult
    from jobs.stages.verdicts import quarantined_rows, unscored_rows

    rows = pa.table({"image_id": ["t1", "t2", "v1", "p1"], "dataset": ["d", "d", "d", "prod"], "batch": [None, None, None, "n1"],
                     "split": ["train", "train", "val", "test"], "label": pa.array([3, 4, 5, None], pa.int32())})
    bad = pa.table({"image_id": ["q1"], "dataset": ["d"], "split": ["test"], "stage": ["manifest"], "reason": ["label 9 out of range"]},
                   schema=storage.QUARANTINE_SCHEMA)
    manifest = ManifestResult(tmp_path, rows, bad, "")
    q = quarantined_rows(manifest, SimpleNamespace(quarantine=[]))
    missing = ["score", "risk", "score_threshold", "risk_threshold"]
    assert q.drop(columns=missing).to_dict("records") == [{
        "image_id": "q1", "dataset": "d", "batch": "", "split": "test", "subset": "", "label": -1, "pred": -1,
        "is_ood": False, "likely_wrong": False, "flagged": True, "verdict": "quarantined",
        "reasons": ["quarantined:label 9 out of range"], "why": "quarantined: label 9 out of range"}]
    assert q[missing].isna().all(axis=None)
    u = unscored_rows(manifest, {"v1", "p1"})  # v1 and p1 were scored
    assert list(u.image_id) == ["t1", "t2"] and list(u.label) == [3, 4] and (u.verdict == "unscored").all()
    assert not u.flagged.any() and u.reasons.map(len).eq(0).all() and u.why.str.startswith("not scored: fitting data").all()
    assert list(unscored_rows(manifest, {"t1", "t2", "v1"}).batch) == ["n1"]  # the batch of an unscored incoming image
