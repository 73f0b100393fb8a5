"""The whole job on a small digits subset: outputs, definitions, reuse, quarantine, config errors."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.special import logsumexp, softmax

from jobs import cli, pipeline, shards, storage
from jobs.config import ConfigError, load_config, parse_config
from oodlib.metrics import ood_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found on the machine
    yield
    ray.shutdown()


def small_config(tmp_path: Path, **data) -> dict:
    return {
        "experiment": "t",
        "output": str(tmp_path / "out"),
        "data": {"source": "digits", "limit_per_split": 40, **data},
        "embed": {"batch_size": 32, "num_actors": 1, "num_shards": 4},
        "detectors": ["msp", "maxlogit", {"name": "energy", "params": {"temperature": 2.0}, "column": "energy_t2"}],
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


def test_pipeline_end_to_end_and_reuse(tmp_path, ray_local):
    cfg = parse_config(small_config(tmp_path))
    summary = pipeline.run(cfg, schedule="test")
    root = Path(cfg.output) / "t"
    assert json.loads((root / "last_run.json").read_text())["run_id"] == summary["run_id"]
    assert all(Path(p, "_SUCCESS").is_file() for p in summary["stages"].values())
    counts = summary["counts"]["embed"]
    # 3 ID splits + 3 OOD sets, 40 each
    assert counts == {"input": 240, "features": 240, "quarantined": 0, "shards_total": 4, "shards_recomputed": 4, "images_embedded": 240}

    feature_dirs = shards.index_dirs(summary["stages"]["embed"], "features")
    feats = storage.read_table(feature_dirs).to_pandas()
    scores = storage.read_table(shards.index_dirs(summary["stages"]["score"], "scores")).to_pandas()
    scored = feats[~((feats.dataset == "digits") & (feats.split == "train"))]  # all but the fitting data
    assert len(feats) == 240 and len(scores) == len(scored) == 200 and set(scored.image_id) == set(scores.image_id)
    s = scores.set_index("image_id").loc[scored.image_id]
    logits = np.stack(scored.logits.to_numpy())
    np.testing.assert_allclose(s.score_msp, softmax(logits.astype(np.float64), 1).max(1), rtol=1e-5)
    np.testing.assert_allclose(s.score_maxlogit, logits.max(1), rtol=1e-6)
    np.testing.assert_allclose(s.score_energy_t2, 2.0 * logsumexp(logits / 2.0, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(s.pred, logits.argmax(1))
    # features table: fixed-size vectors readable as plain Arrow
    schema = pq.read_schema(next(feature_dirs[0].rglob("*.parquet")))
    assert schema.field("features").type == pa.list_(pa.float32(), 64)
    assert schema.field("logits").type == pa.list_(pa.float32(), 8)

    metrics = pq.read_table(Path(summary["stages"]["evaluate"]) / "metrics.parquet").to_pandas()
    row = metrics[(metrics.method == "msp") & (metrics.dataset == "noise") & (metrics.metric == "auroc")]
    id_s = scores[(scores.dataset == "digits") & (scores.split == "test")].score_msp
    expected = ood_metrics(id_s.to_numpy(), scores[scores.dataset == "noise"].score_msp.to_numpy())["auroc"]
    assert row.value.item() == pytest.approx(expected)
    avg = metrics[(metrics.method == "msp") & (metrics.dataset == "avg") & (metrics.metric == "fpr95")].value.item()
    per_set = metrics[(metrics.method == "msp") & (metrics.metric == "fpr95") & (metrics.dataset != "avg")].value
    assert avg == pytest.approx(per_set.mean()) and len(per_set) == 3
    assert (Path(summary["stages"]["evaluate"]) / "plots" / "msp.png").stat().st_size > 1000

    # MLflow: parent + one child per detector with {dataset}.{metric}
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["t"])
    children = runs[runs["tags.mlflow.parentRunId"] == summary["mlflow_run_id"]]
    assert sorted(children["tags.method"]) == ["energy_t2", "maxlogit", "msp"]
    child = children[children["tags.method"] == "msp"].iloc[0]
    assert child["metrics.noise.auroc"] == pytest.approx(expected)
    assert child["tags.schedule"] == "test" and child["tags.model_hash"] == summary["model_hash"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary["mlflow_run_id"])}
    assert {"run_summary.json", "metrics.parquet", "results.md"} <= artifacts
    logged = mlflow.artifacts.load_dict(f"runs:/{summary['mlflow_run_id']}/run_summary.json")
    assert logged["counts"]["embed"]["features"] == 240 and logged["throughput_images_per_s"] > 0

    again = pipeline.run(cfg)
    assert again["reused"] == {"manifest": True, "embed": True, "fit": True, "score": True, "evaluate": True}
    assert again["stages"] == summary["stages"] and again["counts"]["embed"]["shards_recomputed"] == 0


def test_quarantine_counts_reconcile(tmp_path, ray_local, digits_sets):
    from oodlib.data.manifest import manifest_from_image_sets

    from oodlib.data.digits import ImageSet

    sets = [digits_sets[k] for k in [("digits", "train"), ("digits", "val"), ("digits", "test"), ("noise", "test")]]
    sets = [ImageSet(s.dataset, s.split, s.images[:120], s.labels[:120], s.image_ids[:120]) for s in sets]
    table = manifest_from_image_sets(sets)
    images = table.column("image").to_pylist()
    bad_ids = {}
    for i, payload in [(3, b""), (200, b"garbage"), (300, images[300][:40])]:
        images[i] = payload
        bad_ids[table.column("image_id")[i].as_py()] = payload
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    labels = table.column("label").to_pylist()
    labels[10] = 8  # the digits model has 8 classes
    bad_ids[table.column("image_id")[10].as_py()] = "label"
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    dup = table.slice(20, 1).set_column(table.schema.get_field_index("label"), "label", pa.array([0], pa.int32()))
    table = pa.concat_tables([table, dup])  # a repeated image_id: the first occurrence is kept
    pq.write_table(table, tmp_path / "manifest.parquet")
    raw = small_config(tmp_path, source="manifest", manifest=str(tmp_path / "manifest.parquet"), ood_datasets=["noise"])
    raw["data"].pop("limit_per_split")
    summary = pipeline.run(parse_config(raw))
    counts = summary["images"]
    assert counts["input"] == table.num_rows and counts["quarantined"] == 5
    assert counts["features"] + counts["quarantined"] == counts["input"]
    assert summary["counts"]["embed"]["quarantined"] == 3 and summary["counts"]["manifest"]["quarantined"] == 2
    q_embed = storage.read_table(shards.index_dirs(summary["stages"]["embed"], "quarantine")).to_pandas()
    q_manifest = pq.read_table(Path(summary["stages"]["manifest"]) / "quarantine.parquet").to_pandas()
    assert set(q_embed.image_id) == set(list(bad_ids)[:3])
    assert q_embed.set_index("image_id").loc[list(bad_ids)[0], "reason"] == "zero-length image bytes"
    dup_id = table.column("image_id")[20].as_py()
    assert sorted(q_manifest.image_id) == sorted([list(bad_ids)[3], dup_id])
    assert "out of range" in q_manifest.set_index("image_id").loc[list(bad_ids)[3], "reason"]
    feats = storage.read_table(shards.index_dirs(summary["stages"]["embed"], "features"), ["image_id", "split", "label"]).to_pandas()
    assert len(feats) == table.num_rows - 5 and not set(feats.image_id) & set(bad_ids)
    assert feats.set_index("image_id").loc[dup_id, "label"] == table.column("label")[20].as_py()
    scores = storage.read_table(shards.index_dirs(summary["stages"]["score"], "scores")).to_pandas()
    assert set(scores.image_id) == set(feats.image_id[feats.split != "train"]) and scores.image_id.is_unique


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"detectors": ["msp", "nonsense"]}, "detectors.1.name"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"embed": {"batch_size": 0}}, "embed.batch_size"),
        ({"model": {"name": "resnet18", "weights": "/nope/resnet18.pth"}}, "model.weights"),
        ({"data": {"source": "manifest", "manifest": "/nope/m.parquet"}}, "data.manifest"),
        ({"data": {"ood_datasets": ["digits-near", "cifar"]}}, "data.ood_datasets"),
    ],
)
def test_bad_config_exits_2_before_ray(tmp_path, monkeypatch, capsys, patch, field):
    raw = small_config(tmp_path)
    for k, v in patch.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))

    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert cli.main(["run", "--config", str(path)]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out" / "t" / "embed").exists()


def test_overrides_and_missing_file(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path)))
    cfg = load_config(path, {"embed.batch_size": 7, "data.seed": 3})
    assert cfg.embed.batch_size == 7 and cfg.data.seed == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="duplicate columns"):
        parse_config({**small_config(tmp_path), "detectors": ["msp", "msp"]})


def test_incremental_run_recomputes_only_affected_shards(tmp_path, ray_local, digits_sets):
    from oodlib.data.digits import ImageSet
    from oodlib.data.manifest import manifest_from_image_sets

    base = [digits_sets[k] for k in [("digits", "train"), ("digits", "test"), ("noise", "test")]]
    base = [ImageSet(s.dataset, s.split, s.images[:60], s.labels[:60], s.image_ids[:60]) for s in base]
    pq.write_table(manifest_from_image_sets(base), tmp_path / "m.parquet")
    raw = small_config(tmp_path, source="manifest", manifest=str(tmp_path / "m.parquet"), ood_datasets=["noise"])
    raw["data"].pop("limit_per_split")
    raw["embed"]["num_shards"] = 16
    first = pipeline.run(parse_config(raw))

    near = digits_sets[("digits-near", "test")]
    new = ImageSet("noise", "test", near.images[:3], np.full(3, -1), [f"noise/test/new-{i}" for i in range(3)])
    pq.write_table(manifest_from_image_sets([*base, new]), tmp_path / "m.parquet")
    second = pipeline.run(parse_config(raw))

    affected = len(set(shards.shard_of(new.image_ids, 16).tolist()))
    assert second["counts"]["embed"]["shards_recomputed"] == affected < 16
    assert second["counts"]["embed"]["images_embedded"] == 3  # the rest of those shards is copied
    assert second["reused"]["fit"] is True  # only test images were added: the detectors are not refitted
    assert second["counts"]["embed"]["features"] == first["counts"]["embed"]["features"] + 3
    s1 = storage.read_table(shards.index_dirs(first["stages"]["score"], "scores")).to_pandas().set_index("image_id")
    s2 = storage.read_table(shards.index_dirs(second["stages"]["score"], "scores")).to_pandas().set_index("image_id")
    assert set(s2.index) == set(s1.index) | set(new.image_ids)
    np.testing.assert_array_equal(s2.loc[s1.index, "score_msp"], s1.score_msp)
    f1 = storage.read_table(shards.index_dirs(first["stages"]["embed"], "features")).to_pandas().set_index("image_id")
    f2 = storage.read_table(shards.index_dirs(second["stages"]["embed"], "features")).to_pandas().set_index("image_id")
    np.testing.assert_array_equal(np.stack(f2.loc[f1.index, "features"]), np.stack(f1.features))  # copied rows intact

    # a changed image (same id, new bytes) is re-embedded; its unchanged shard-mates are copied
    changed = ImageSet("noise", "test", near.images[3:4], np.full(1, -1), [new.image_ids[0]])
    pq.write_table(manifest_from_image_sets([*base, ImageSet(new.dataset, new.split, new.images[1:], new.labels[1:], new.image_ids[1:]), changed]), tmp_path / "m.parquet")
    third = pipeline.run(parse_config(raw))
    assert third["counts"]["embed"]["shards_recomputed"] == 1 and third["counts"]["embed"]["images_embedded"] == 1


def test_all_stages_integrate(tmp_path, ray_local):
    """Every stage on a tiny digits subset: ODIN, conductance, LCR and gfeatures in the one EMBED
    pass; ERRORS, GRAPH and EXPLAIN outputs present and consistent; MLflow children logged."""
    # 60 per split: digits-c's ~22% errors must reach each of the error detector's fit/val/test parts
    limit = 60
    raw = small_config(tmp_path, limit_per_split=limit, extra_datasets=["digits-c"],
                       ood_groups={"near": ["digits-near"], "far": ["photo-patches", "noise"]})
    raw["detectors"] = ["msp", "odin", "mahalanobis", {"name": "knn", "params": {"k": 5}}, "line"]
    raw["errors"] = {"enabled": True, "n_steps": 4, "mutants": {"operator": "NAI", "rate": 0.02, "n_accepted": 4, "max_tries": 200},
                     "extra_datasets": ["digits-c"], "detector_epochs": 3}
    raw["graph"] = {"enabled": True, "train_dataset": "digits-lt100", "oe_dataset": "photo-oe", "epochs": 3, "hidden": 16,
                    "ablations": ["pretrain", "gcn"]}
    raw["explain"] = {"enabled": True, "methods": ["rap", "gradient"], "counts": {"wrong": 1, "uncertain": 2, "risky_ood": 2, "random": 1}}
    summary = pipeline.run(parse_config(raw))

    feats = storage.read_table(shards.index_dirs(summary["stages"]["embed"], "features"))
    for column, width in [("conductance", 64), ("gfeatures", 64), ("lcr_flips", 4)]:
        assert feats.schema.field(column).type == pa.list_(pa.float32(), width)
    assert feats.schema.field("lcr_mutants_used").type == pa.int16()
    assert feats.schema.field("odin").type == pa.float32()
    lcr = feats.column("lcr").to_numpy()
    flips = storage.vector_to_numpy(feats.column("lcr_flips"))
    np.testing.assert_allclose(lcr, flips.mean(1), atol=1e-6)  # no early stop: LCR over all 4 mutants

    risks = pq.read_table(Path(summary["stages"]["errors"]) / "risks.parquet").to_pandas()
    n_error_rows = int(np.isin(feats.column("dataset").to_numpy(zero_copy_only=False).astype(str), ["digits", "digits-c"]).sum())
    assert len(risks) == n_error_rows and set(risks.part) == {"fit", "val", "test"}
    assert {"risk_conductance", "risk_lcr", "risk_lcr_sprt", "risk_fusion_nn", "risk_fusion_qda"} <= set(risks.columns)
    c_rows = risks[risks.dataset == "digits-c"]
    src = c_rows.image_id.str.rsplit("/", n=1).str[1]
    assert (c_rows.groupby(src).part.nunique() == 1).all()  # corrupted twins never straddle splits

    # FD-Shifts failure detection: every method on every failure source, with bootstrap intervals
    errors_dir = Path(summary["stages"]["errors"])
    em = pq.read_table(errors_dir / "metrics.parquet").to_pandas()
    fail = em[em.task == "failure"]
    sources = ["iid", "corruption/digits-c", "new-class/digits-near"]
    assert list(fail.dataset.drop_duplicates()) == sources
    methods = {"msr", "mls", "energy", "entropy", "gen", "doctor_alpha", "doctor_beta", "tempscale_msr",
               "conductance", "lcr", "lcr_sprt", "fusion_nn", "fusion_rf", "fusion_lda", "fusion_qda"}
    assert set(fail.method) == methods | {"model"}
    for m in ("aurc", "e_aurc", "augrc", "auroc_f", "fpr95_f", "ece"):
        assert set(fail[fail.metric == m].method) == methods and set(fail[fail.metric == f"{m}_lo"].method) == methods
    aurc = fail[fail.metric == "aurc"]
    assert aurc.value.between(0, 1).all() and len(aurc) == len(methods) * len(sources)
    for src in sources:
        assert (errors_dir / f"failure_rc_{src.replace('/', '_')}.png").stat().st_size > 10_000
    conf = pq.read_table(errors_dir / "failure_confidences.parquet").to_pandas()
    ids = conf[(conf.dataset == "digits") & (conf.part == "test")]
    n_iid = fail[(fail.dataset == "iid") & (fail.method == "model") & (fail.metric == "n")].value.item()
    assert n_iid == len(ids) == len(risks[(risks.dataset == "digits") & (risks.part == "test")])
    from oodlib.metrics import aurc as aurc_of

    msr_iid = aurc[(aurc.dataset == "iid") & (aurc.method == "msr")].value.item()
    assert msr_iid == pytest.approx(aurc_of(ids.conf_msr, ids.correct), abs=1e-6)  # float32 confidences on disk
    near = conf[conf.dataset == "digits-near"]
    n_new = fail[(fail.dataset == "new-class/digits-near") & (fail.method == "model") & (fail.metric == "n")].value.item()
    assert len(near) == limit and not near.correct.any() and n_new == len(near) + ids.correct.sum()  # wrong ID rows dropped
    assert "#### new-class/digits-near" in (errors_dir / "failure.md").read_text()
    ev = pq.read_table(Path(summary["stages"]["evaluate"]) / "metrics.parquet").to_pandas()
    msp = ev[(ev.method == "msp") & (ev.metric == "auroc")].set_index("dataset").value
    assert msp["far"] == pytest.approx((msp["photo-patches"] + msp["noise"]) / 2) and msp["near"] == msp["digits-near"]

    g = pq.read_table(Path(summary["stages"]["graph"]) / "graph_scores.parquet").to_pandas()
    assert set(g.method) == {"pretrain", "gcn"} and set(g.ood_set) == {"digits-near", "photo-patches", "noise"}
    assert len(g[(g.method == "gcn") & (g.ood_set == "noise")]) == limit + limit  # ID test ∪ that OOD set

    maps = pq.read_table(Path(summary["stages"]["explain"]) / "maps.parquet").to_pandas()
    assert len(maps) == 6 * 2 and set(maps.method) == {"rap", "gradient"}
    assert maps["map"].iloc[0].dtype == np.float16 and len(maps["map"].iloc[0]) == 32 * 32
    assert len(list(Path(summary["stages"]["explain"]).glob("maps_*.png"))) == 4

    import mlflow

    mlflow.set_tracking_uri(summary["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["t"])
    kids = runs[runs["tags.mlflow.parentRunId"] == summary["mlflow_run_id"]]
    children = set(kids["tags.method"])
    assert {"odin", "line", "error/conductance", "error/fusion_lda", "lt/gcn", "explain", "error/msr", "error/doctor_alpha"} <= children
    msr_child = kids[kids["tags.method"] == "error/msr"].iloc[0]
    assert msr_child["metrics.iid.aurc"] == pytest.approx(msr_iid) and "metrics.new-class/digits-near.augrc_hi" in kids.columns
    assert kids[kids["tags.method"] == "msp"].iloc[0]["metrics.near.auroc"] == pytest.approx(msp["near"])
