"""Content-keyed, atomic stage storage and Arrow vector columns."""
import numpy as np
import pyarrow as pa
import pytest

from jobs import storage


def test_commit_is_atomic_and_reused(tmp_path):
    target = storage.stage_dir(tmp_path, "exp", "embed", storage.content_key("embed", 1, a=1))
    assert not target.committed()
    with pytest.raises(RuntimeError):
        with target.writing() as tmp:
            (tmp / "part.txt").write_text("half")
            raise RuntimeError("crash mid-stage")
    assert not target.path.exists() and list(target.root.iterdir()) == []  # nothing that looks complete
    with target.writing() as tmp:
        (tmp / "part.txt").write_text("whole")
    assert target.committed() and (target.path / "part.txt").read_text() == "whole"
    with target.writing() as tmp:  # a second writer of the same key keeps the first result
        (tmp / "part.txt").write_text("other")
    assert (target.path / "part.txt").read_text() == "whole"
    assert [p.name for p in target.root.iterdir()] == [target.path.name]


def _commit_table(tmp_path, rows: int = 10) -> storage.StageDir:
    target = storage.stage_dir(tmp_path, "exp", "score", "k")
    with target.writing() as tmp:
        storage.write_table(pa.table({"x": np.arange(rows)}), tmp / "scores", "part-0.parquet")
        (tmp / "note.md").write_text("a table")
    return target


def test_commit_lists_files_with_sizes_hashes_and_rows(tmp_path):
    import json

    target = _commit_table(tmp_path, rows=10)
    listed = json.loads((target.path / storage.FILES).read_text())
    assert set(listed) == {"scores/part-0.parquet", "note.md"}
    assert listed["scores/part-0.parquet"]["rows"] == 10 and "rows" not in listed["note.md"]
    assert listed["note.md"]["size"] == 7 and listed["note.md"]["hash"] == storage.file_hash(target.path / "note.md")
    assert storage.problems(target.path, hashes=True) == []
    assert storage.committed_rows(target.path / "scores") == 10 == storage.read_table(target.path / "scores").num_rows


@pytest.mark.parametrize("damage", ["truncate", "delete", "bitflip"])
def test_damaged_commit_is_detected_and_discarded(tmp_path, damage):
    target = _commit_table(tmp_path)
    f = target.path / "scores" / "part-0.parquet"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        f.unlink()
    else:  # same size, one bit different: only the hash check sees it
        f.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    found = storage.problems(target.path, hashes=True)
    assert len(found) == 1 and found[0].startswith("scores/part-0.parquet")
    if damage == "bitflip":
        assert storage.problems(target.path) == [] and target.committed()  # sizes match: reuse's cheap check passes
        assert not target.committed(hashes=True)
    else:
        with pytest.raises(storage.DamagedError):
            storage.read_table(target.path / "scores")  # readers never read around a damaged file
        assert not target.committed()
    assert not target.path.exists()  # discarded: the next run recomputes it


def test_uncommitted_parquet_is_not_read(tmp_path):
    target = _commit_table(tmp_path, rows=10)
    storage.write_table(pa.table({"x": np.arange(3)}), target.path / "scores", "stray.parquet")  # written after the commit
    with pytest.raises(storage.DamagedError, match="13 rows on disk, 10 committed"):
        storage.read_table(target.path / "scores")


def test_incomplete_leftover_is_replaced(tmp_path):
    target = storage.stage_dir(tmp_path, "exp", "fit", "k")
    target.path.mkdir(parents=True)
    (target.path / "junk").write_text("x")  # no _SUCCESS: e.g. a copy interrupted by hand
    with target.writing() as tmp:
        (tmp / "ok").write_text("y")
    assert target.committed() and not (target.path / "junk").exists()


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

    target = storage.stage_dir(tmp_path, "exp", "embed", "k")
    with target.writing() as tmp:
        pq.write_to_dataset(table, tmp / "ds", partition_cols=["part"])
    back = storage.read_table(target.path / "ds")
    order = np.argsort(back.column("part").to_pylist(), kind="stable")
    np.testing.assert_array_equal(storage.vector_to_numpy(back.column("v"))[order], x)
    with pytest.raises(ValueError, match="2-D"):
        storage.vector_column(np.zeros(3))


def test_file_hash(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "b").write_bytes(b"hello!")
    assert storage.file_hash(tmp_path / "a") != storage.file_hash(tmp_path / "b")
    assert len(storage.file_hash(tmp_path / "a")) == 32  # BLAKE2b, 16 bytes


def test_tracking_uri_passwords_are_redacted():
    from jobs.tracking import redact_uri

    assert redact_uri("postgresql://ood:s3cret@db.internal:5432/mlflow") == "postgresql://ood:***@db.internal:5432/mlflow"
    assert redact_uri("sqlite:////tmp/out/mlflow.db") == "sqlite:////tmp/out/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    # no user name, and secrets in the query string
    assert redact_uri("postgresql://:secret@h/db") == "postgresql://:***@h/db"
    assert redact_uri("postgresql://u@h/db?password=secret") == "postgresql://u@h/db?password=***"
    assert redact_uri("postgresql+psycopg://u:p%40ss@h:5432/db?sslmode=require&PASSWORD=x") == \
        "postgresql+psycopg://u:***@h:5432/db?sslmode=require&PASSWORD=***"
    assert "secret" not in redact_uri("https://u:secret@mlflow.example.com/?token=secret&x=1")
