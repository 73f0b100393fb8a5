"""Content-keyed, atomic stage storage and Arrow vector columns."""
import numpy as np
import pyarrow as pa
import pytest

from jobs import storage


def test_commit_is_atomic_and_reused(tmp_path):
    target = storage.stage_dir(tmp_path, "exp", "embed", storage.content_key("embed", 1, a=1))
    assert not target.done
    with pytest.raises(RuntimeError):
        with target.writing() as tmp:
            (tmp / "part.parquet").write_text("half")
            raise RuntimeError("crash mid-stage")
    assert not target.path.exists() and list(target.root.iterdir()) == []  # nothing that looks complete
    with target.writing() as tmp:
        (tmp / "part.parquet").write_text("whole")
    assert target.done and (target.path / "part.parquet").read_text() == "whole"
    with target.writing() as tmp:  # a second writer of the same key keeps the first result
        (tmp / "part.parquet").write_text("other")
    assert (target.path / "part.parquet").read_text() == "whole"
    assert [p.name for p in target.root.iterdir()] == [target.path.name]


def test_incomplete_leftover_is_replaced(tmp_path):
    target = storage.stage_dir(tmp_path, "exp", "fit", "k")
    target.path.mkdir(parents=True)
    (target.path / "junk").write_text("x")  # no _SUCCESS: e.g. a copy interrupted by hand
    with target.writing() as tmp:
        (tmp / "ok").write_text("y")
    assert target.done and not (target.path / "junk").exists()


def test_content_key_depends_on_every_input():
    base = storage.content_key("score", 1, fit="a", embed="b")
    assert base == storage.content_key("score", 1, embed="b", fit="a")
    assert base != storage.content_key("score", 2, fit="a", embed="b")
    assert base != storage.content_key("score", 1, fit="a", embed="c")


def test_vector_column_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    col = storage.vector_column(x)
    assert col.type == pa.list_(pa.float32(), 3)
    table = pa.table({"v": col, "part": ["a", "a", "b", "b", "b"]})
    import pyarrow.parquet as pq

    pq.write_to_dataset(table, tmp_path / "ds", partition_cols=["part"])
    back = storage.read_table(tmp_path / "ds")
    order = np.argsort(back.column("part").to_pylist(), kind="stable")
    np.testing.assert_array_equal(storage.vector_to_numpy(back.column("v"))[order], x)
    with pytest.raises(ValueError, match="2-D"):
        storage.vector_column(np.zeros(3))


def test_file_hash(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "b").write_bytes(b"hello!")
    assert storage.file_hash(tmp_path / "a") != storage.file_hash(tmp_path / "b")
    assert len(storage.file_hash(tmp_path / "a")) == 16


def test_tracking_uri_passwords_are_redacted():
    from jobs.tracking import redact_uri

    assert redact_uri("postgresql://ood:s3cret@db.internal:5432/mlflow") == "postgresql://ood:***@db.internal:5432/mlflow"
    assert redact_uri("sqlite:////tmp/out/mlflow.db") == "sqlite:////tmp/out/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
