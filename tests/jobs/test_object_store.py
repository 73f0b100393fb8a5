"""The commit protocol on an object store (moto's S3 server): ``_SUCCESS`` last, an interrupted
upload is not a commit and is cleared, damage is detected, the node mirror is checked against the store."""
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import storage, store
from tests.jobs.servers import gcs_bucket, s3_bucket  # noqa: F401  (the module's S3 and GCS fixtures)
from tests.jobs.test_pipeline import ray_local  # noqa: F401  (the module's Ray fixture: started after the S3 one)


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> str:
    """``s3://<bucket>`` (moto) or ``gs://<bucket>`` (fake-gcs-server): the store protocol's tests run on both."""
    return f"{request.param}://" + request.getfixturevalue({"s3": "s3_bucket", "gs": "gcs_bucket"}[request.param])


def _objects(base: str, prefix: str) -> dict[str, int]:
    return store.listing(store.root_path(f"{base}/{prefix}"))


def _commit(base: str, rows: int = 10, key: str = "k") -> storage.StageDir:
    target = storage.stage_dir(f"{base}/out", "exp", "score", key)
    with target.writing() as tmp:
        storage.write_table(pa.table({"x": np.arange(rows)}), tmp / "scores", "part-0.parquet")
        (tmp / "note.md").write_text("a table")
    return target


def test_commit_uploads_everything_then_success_last(bucket, monkeypatch):
    order = []
    upload = store.upload
    monkeypatch.setattr(store, "upload", lambda d, files, dest=None: (order.append(list(files)), upload(d, files, dest)))
    target = _commit(bucket)
    assert order[-1] == [storage.SUCCESS] and storage.SUCCESS not in order[0]
    assert set(order[0]) == {"scores/part-0.parquet", "note.md", storage.FILES}
    objects = _objects(bucket, "out/exp/score/key=k")
    assert set(objects) == {"scores/part-0.parquet", "note.md", storage.FILES, storage.SUCCESS}
    assert store.uri(target.path) == f"{bucket}/out/exp/score/key=k"
    assert target.path.is_relative_to(store.cache_root())  # the local copy is the node's mirror
    assert target.committed() and storage.problems(target.path, hashes=True) == []
    assert storage.read_table(target.path / "scores").column("x").to_pylist() == list(range(10))


def test_interrupted_upload_is_not_committed_and_is_cleared(bucket, monkeypatch):
    upload = store.upload

    def crash_before_success(d, files, dest=None):
        if storage.SUCCESS in files:
            raise ConnectionError("network gone before _SUCCESS")
        upload(d, files, dest)

    monkeypatch.setattr(store, "upload", crash_before_success)
    with pytest.raises(ConnectionError):
        _commit(bucket, key="crash")
    target = storage.stage_dir(f"{bucket}/out", "exp", "score", "crash")
    left = _objects(bucket, "out/exp/score/key=crash")
    assert "note.md" in left and storage.SUCCESS not in left  # uploaded files, but no commit
    assert not target.committed() and not target.path.exists()
    with pytest.raises(storage.DamagedError, match="not committed"):
        storage.fetch(target.path)
    monkeypatch.setattr(store, "upload", upload)
    with target.writing() as tmp:  # the rewrite clears the leftovers first
        (tmp / "other.md").write_text("whole")
    assert set(_objects(bucket, "out/exp/score/key=crash")) == {"other.md", storage.FILES, storage.SUCCESS}


@pytest.mark.parametrize("damage", ["delete", "truncate", "bitflip"])
def test_damaged_object_is_detected(bucket, damage):
    target = _commit(bucket, key=f"d-{damage}")
    fs, where = store.fs_of(target.path / "scores" / "part-0.parquet")
    data = store.read_bytes(target.path / "scores" / "part-0.parquet")
    if damage == "delete":
        fs.delete_file(where)
    else:
        with fs.open_output_stream(where) as out:
            out.write(data[: len(data) // 2] if damage == "truncate" else data[:100] + bytes([data[100] ^ 1]) + data[101:])
    found = storage.problems(target.path, hashes=True)
    assert len(found) == 1 and found[0].startswith("scores/part-0.parquet")
    checked, damaged = storage.verify_tree(store.root_path(f"{bucket}/out/exp/score"))
    assert checked >= 1 and list(damaged) == [target.path]
    if damage == "bitflip":  # sizes match: the cheap reuse check passes, a fresh mirror copy does not
        assert target.committed()
        import shutil

        shutil.rmtree(target.path)
        with pytest.raises(storage.DamagedError, match="differs from its commit"):
            storage.fetch(target.path / "scores")
    else:
        assert not target.committed()  # discarded: the next run recomputes it
        assert _objects(bucket, f"out/exp/score/key=d-{damage}") == {}


def test_mirror_is_filled_from_the_store_and_refreshed(bucket):
    import shutil

    target = _commit(bucket, key="m")
    shutil.rmtree(target.path)  # another node: nothing mirrored yet
    assert storage.read_table(target.path / "scores").num_rows == 10  # fetched into the mirror
    assert json.loads((target.path / storage.FILES).read_text())["note.md"]["size"] == 7
    storage.discard(target.path)  # gc'd, then committed again with other content
    assert not target.path.exists()
    _commit(bucket, rows=3, key="m")
    (target.path / storage.SUCCESS).write_text("{}")  # a stale mirror copy of another commit …
    assert storage.read_table(target.path / "scores").num_rows == 3  # … is replaced


@pytest.mark.parametrize("output, message", [
    ("ftp://x/y", "output: ftp:// is not a supported output"),
    ("s3://oodlib-test/out", "output: s3://oodlib-test/out is not writable"),  # nothing listens on the endpoint
    ("s3://no-such-bucket/out", "output: s3://no-such-bucket/out is not writable"),
])
def test_bad_output_exits_2_before_ray(tmp_path, monkeypatch, capsys, s3_bucket, output, message):  # noqa: F811
    import ray
    import yaml

    from jobs import cli
    from tests.jobs.servers import free_port

    if output.startswith("s3://oodlib-test"):
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start for a bad output"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"experiment": "t", "output": output, "data": {"source": "digits", "limit_per_split": 20}}))
    assert cli.main(["run", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_output_uri_validation_and_probe(bucket):
    from jobs.config import parse_config

    cfg = parse_config({"experiment": "t", "output": f"{bucket}/a/b/"})
    assert cfg.output == f"{bucket}/a/b" and isinstance(cfg.output, str)
    scheme, _, name = bucket.partition("://")
    assert store.root_path(cfg.output) == store.cache_root() / scheme / name / "a" / "b"
    assert not [rel for rel in _objects(bucket, "a") if ".oodlib-probe" in rel]  # the probe object is deleted
    assert parse_config({"experiment": "t", "output": "file:///tmp/x"}).output == Path("/tmp/x")


def test_submit_passes_store_variables_without_printing_them(tmp_path, s3_bucket, monkeypatch, capsys):  # noqa: F811
    import ray.job_submission
    import yaml

    from jobs import cli

    submitted = {}

    class Client:  # the Jobs API, recording what it is given
        def __init__(self, address):
            pass

        def submit_job(self, entrypoint, runtime_env, submission_id=None):
            submitted.update(entrypoint=entrypoint, env=runtime_env["env_vars"])
            return "raysubmit_1"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"experiment": "t", "output": f"s3://{s3_bucket}/n"}))
    assert cli.main(["submit", "--config", str(path), "--no-wait"]) == 0
    env, out = submitted["env"], capsys.readouterr().out
    assert env["AWS_SECRET_ACCESS_KEY"] == "very-secret-value" and env["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    assert "very-secret-value" not in out + submitted["entrypoint"] and "AWS_SECRET_ACCESS_KEY" in out
    assert f"output=s3://{s3_bucket}/n" in submitted["entrypoint"] and "mlflow.tracking_uri" not in submitted["entrypoint"]

@pytest.mark.slow
def test_pipeline_on_s3_equals_local_reuses_recovers_and_gc(tmp_path, s3_bucket, ray_local, digits_sets, monkeypatch):  # noqa: F811
    """The job with ``output: s3://…``: the published rows equal a local run's; a rerun reuses
    every stage and uploads no stage data; a shard whose upload stopped before ``_SUCCESS`` is
    recomputed; ``oodlib gc`` frees superseded shards in the bucket and the next run reuses everything."""
    import time

    import polars as pl
    import pyarrow.parquet as pq
    import yaml

    from jobs import cli, pipeline
    from jobs.config import parse_config
    from oodlib.data.digits import ImageSet
    from oodlib.data.manifest import manifest_from_image_sets
    from tests.jobs.test_published_tables import config

    base = [digits_sets[k] for k in [("digits", "train"), ("digits", "test"), ("noise", "test")]]
    base = [ImageSet(s.dataset, s.split, s.images[:50], s.labels[:50], s.image_ids[:50]) for s in base]
    manifest = tmp_path / "m.parquet"
    pq.write_table(manifest_from_image_sets(base), manifest)
    local_raw = config(tmp_path, manifest)
    raw = {**local_raw, "output": f"s3://{s3_bucket}/nightly"}
    tables = f"s3://{s3_bucket}/nightly/p/tables"

    def published(root: str, name: str) -> pa.Table:
        from deltalake import DeltaTable

        table = DeltaTable(f"{root}/{name}").to_pyarrow_table()
        return table.sort_by([(c, "ascending") for c in ("image_id", "task", "method", "dataset", "metric") if c in table.column_names])

    pipeline.run(parse_config(local_raw))
    t0 = time.time()
    first = pipeline.run(parse_config(raw))
    first_s = time.time() - t0
    objects = store.listing(store.root_path(f"s3://{s3_bucket}/nightly"))
    assert first["stages"]["score"].startswith(f"s3://{s3_bucket}/nightly/p/score/key=")
    assert first["tables"]["scores"]["path"] == f"{tables}/scores"
    for name in ("scores", "features", "metrics"):
        on_s3, on_disk = published(tables, name), published(str(tmp_path / "out" / "p" / "tables"), name)
        assert on_s3.num_rows == on_disk.num_rows > 0 and on_s3.equals(on_disk), name  # row for row
    scores = pl.scan_delta(f"{tables}/scores").sort("image_id").collect()  # Polars reads the store too
    assert scores["score_energy"].to_list() == published(tables, "scores").column("score_energy").to_pylist()
    assert json.loads(store.read_bytes(store.root_path(f"s3://{s3_bucket}/nightly/p/last_run.json")))["run_id"] == first["run_id"]

    uploaded = []
    upload = store.upload
    monkeypatch.setattr(store, "upload", lambda d, files, dest=None: (uploaded.extend(files), upload(d, files, dest)))
    second = pipeline.run(parse_config(raw))
    assert all(second["reused"].values())
    # the run records only (runs/<stamp>-<id>.json, last_run.json): no stage data, no _SUCCESS
    assert len(uploaded) == 2 and "last_run.json" in uploaded and uploaded[0] == f"{uploaded[0][:15]}-{second['run_id']}.json"
    print(f"s3 run: first {first_s:.1f} s ({len(objects)} objects, {sum(objects.values()) / 2**20:.1f} MiB in the bucket), "
          f"rerun {second['total_seconds']:.1f} s; rerun uploads: {uploaded}")

    # an upload that stopped before _SUCCESS: not a commit, recomputed (that shard only)
    shard_dirs = sorted({rel.split("/")[0] for rel in store.listing(store.root_path(f"{tables}/features")) if rel.startswith("shard-")})
    interrupted = store.root_path(f"{tables}/features/{shard_dirs[0]}")
    store.delete(interrupted / storage.SUCCESS)
    third = pipeline.run(parse_config(raw))
    assert not third["reused"]["embed"] and third["counts"]["embed"]["shards_recomputed"] == 1
    assert storage.SUCCESS in store.listing(interrupted) and storage.problems(interrupted, hashes=True) == []  # committed again
    assert third["reused"]["fit"] and published(tables, "scores").equals(published(str(tmp_path / "out" / "p" / "tables"), "scores"))

    # new images supersede one shard: gc frees the old version in the bucket, the next run reuses everything
    near = digits_sets[("digits-near", "test")]
    new = ImageSet("noise", "test", near.images[:7], np.full(7, -1), [f"noise/test/new-{i}" for i in range(7)])
    pq.write_table(manifest_from_image_sets([*base, new]), manifest)
    fourth = pipeline.run(parse_config(raw))
    assert not fourth["reused"]["embed"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    before = {rel.split("/")[0] for rel in store.listing(store.root_path(f"{tables}/features")) if rel.startswith("shard-")}
    assert cli.main(["gc", "--config", str(path), "--keep-runs", "1"]) == 0
    after = {rel.split("/")[0] for rel in store.listing(store.root_path(f"{tables}/features")) if rel.startswith("shard-")}
    assert after < before
    runs = [rel for rel in store.listing(store.root_path(f"s3://{s3_bucket}/nightly/p/runs"))]
    assert len(runs) == 1
    fifth = pipeline.run(parse_config(raw))
    assert all(fifth["reused"].values())
    assert published(tables, "features").num_rows == 157
    assert cli.main(["verify", "--config", str(path)]) == 0
    assert cli.main(["report", "--output", f"s3://{s3_bucket}/nightly", "--experiment", "p"]) == 0
