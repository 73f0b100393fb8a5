"""The team tracking setup of cluster/README.md §6, for real: a PostgreSQL server, an MLflow
tracking server on 127.0.0.1 with that database as its backend store, jobs logging through it
over HTTP and ``oodlib compare`` reading it back.

Needs PostgreSQL's server binaries (Debian's ``postgresql`` package). Without them the test is
skipped, unless ``OODLIB_REQUIRE_POSTGRES=1`` (set by ``.ci/run``, which installs them).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.jobs.servers import free_port, stop_group, wait_until_answering

pytestmark = pytest.mark.slow


def pg_bin() -> Path | None:
    """The directory holding initdb / pg_ctl / createdb, or None."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """(uri of an empty database ``mlflow``, data dir) on 127.0.0.1; PostgreSQL refuses to run as
    root, so as root the cluster belongs to the ``postgres`` user."""
    bindir = pg_bin()
    if bindir is None:
        if os.environ.get("OODLIB_REQUIRE_POSTGRES") == "1":
            pytest.fail("OODLIB_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (initdb) were found")
        pytest.skip("no PostgreSQL server binaries (initdb); .ci/run installs them")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="oodlib-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data / "db"), "-U", "oodlib", "-A", "trust", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {data} -F", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "oodlib", "mlflow")
        yield f"postgresql://oodlib@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``http://127.0.0.1:PORT`` of an MLflow server whose backend store is the PostgreSQL database."""
    port = free_port()
    artifacts = tmp_path_factory.mktemp("artifacts")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", postgres, "--artifacts-destination", artifacts.as_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_answering(f"{url}/health", proc, 120, "mlflow server")
    yield url
    stop_group(proc)


def test_jobs_log_to_postgres_through_the_server_and_compare_reads_it(postgres, mlflow_server, monkeypatch, tmp_path, capsys):
    import psycopg
    from tests.jobs.test_compare import AVG, EXP, _log_job

    from mlflow import MlflowClient

    from jobs import cli, compare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = {name: _log_job(mlflow_server, name, "nightly", explain=name == "r3") for name in ("r1", "r2", "r3")}
    MlflowClient(mlflow_server).log_dict(ids["r3"], {"images": {"input": 100, "features": 99, "quarantined": 1}}, "run_summary.json")

    # the rows are in PostgreSQL: 3 parents, 2 detector children each, one explain child
    with psycopg.connect(postgres) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = %s", (EXP,))
        assert cur.fetchone()[0] == 3 + 3 * 2 + 1
        cur.execute("SELECT value FROM tags WHERE run_uuid = %s AND key = 'schedule'", (ids["r3"],))
        assert cur.fetchone()[0] == "nightly"

    fetched = compare.fetch_runs(mlflow_server, EXP, last=5)
    assert list(fetched.parents["run_id"]) == [ids["r3"], ids["r2"], ids["r1"]]
    cmp = compare.compare_runs(compare.tidy_runs(fetched), threshold=0.01).set_index(["run_id", "method", "metric"])
    assert cmp.loc[(ids["r3"], "msp", "fpr95"), "delta"] == pytest.approx(AVG["r3"]["msp"]["fpr95"] - AVG["r2"]["msp"]["fpr95"])
    # r3 regresses msp: the CLI, reading only the tracking server, flags it and exits 1
    code = cli.main(["compare", "--experiment", EXP, "--tracking-uri", mlflow_server, "--png", str(tmp_path / "t.png"), "--fail-on-regression"])
    assert code == 1 and "msp" in capsys.readouterr().out and (tmp_path / "t.png").stat().st_size > 0
