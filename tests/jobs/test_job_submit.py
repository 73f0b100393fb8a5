"""`ray job submit` path: a local head with token auth, a job submitted through
JobSubmissionClient, SUCCEEDED, outputs checked; an unauthenticated submission is rejected."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.jobs.servers import free_port, stop_group, wait_until_answering

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head (token auth, dashboard on 127.0.0.1) in its own process group."""
    from jobs.runtime import private_token_file

    # the head runs in the activated venv, as the README starts it (a job's `python` is the venv's)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    private_token_file()  # the owner-only token file every local job start makes; Ray must accept it
    dash, gcs = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}",  # 52365 may be held by another Ray on this machine
         "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    wait_until_answering(f"{address}/api/version", proc, 90, "Ray head")
    yield address
    stop_group(proc)  # raylet, GCS and workers share the process group: none is left behind


def test_unauthenticated_submission_rejected(ray_head):
    body = json.dumps({"entrypoint": "echo should-not-run"}).encode()
    req = urllib.request.Request(f"{ray_head}/api/jobs/", data=body, headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401


def test_job_submission_succeeds(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = {
        "experiment": "submitted",
        "output": str(tmp_path / "out"),
        "data": {"source": "digits", "limit_per_split": 20},
        "embed": {"batch_size": 32, "num_actors": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    client = JobSubmissionClient(ray_head)
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -m jobs.nightly --config {tmp_path / 'job.yaml'} --schedule test",
        runtime_env={"working_dir": str(REPO), "excludes": ["outputs/", ".venv/", "*.db"]},
    )
    deadline = time.time() + 300
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    summary = json.loads((tmp_path / "out" / "submitted" / "last_run.json").read_text())
    assert summary["counts"]["embed"]["features"] == 120  # 6 (dataset, split) groups × 20
    assert "| digits-near | msp |" in logs and "mlflow ui --backend-store-uri" in logs


#: lines a job prints itself (stage lines, its summary and tables); everything else is Ray's or a library's
OWN = ("[", "|", "#", "images:", "stage seconds:", "shards:", "outputs:", "MLflow run", "  look at it:", "done in", "ID set")


def test_oodlib_submit_twice_one_output_tree_one_store(ray_head, tmp_path):
    """The README's command, run twice from a directory of one's own: outputs and the MLflow store
    land there (not in Ray's per-job package copy), the second run reuses every stage, `oodlib
    compare` lists both runs, each parent run carries the git sha and the resolved config."""
    import mlflow

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "jobs.cli", "submit", "--config", str(REPO / "configs" / "digits.yaml"),
               "--working-dir", str(REPO), "--address", ray_head, "--profile", "smoke", "--schedule", "nightly"]
    runs = [subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = tmp_path / "outputs"
    assert (out / "mlflow.db").is_file() and (out / "digits" / "last_run.json").is_file()
    summary = json.loads((out / "digits" / "last_run.json").read_text())
    assert all(summary["reused"].values()) and all(str(out) in p for p in summary["stages"].values())
    assert not list(Path(tmp_path).rglob("_ray_pkg_*"))

    logs = runs[0].stdout
    foreign = [line for line in logs.splitlines() if line.strip() and not line.startswith(OWN)]
    assert len(foreign) <= 40, "\n".join(foreign)

    uri = f"sqlite:///{out / 'mlflow.db'}"
    compare = subprocess.run([sys.executable, "-m", "jobs.cli", "compare", "--experiment", "digits", "--tracking-uri", uri, "--no-png"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    parents = [r for r in mlflow.search_runs(experiment_names=["digits"], output_format="list") if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    for p in parents:
        assert p.info.run_id[:8] in compare.stdout
        assert p.data.tags["git_sha"] not in ("", "unknown")
        assert p.data.params["data.limit_per_split"] == "60" and f"output={out}" in p.data.params["overrides"]
        config_yaml = Path(client.download_artifacts(p.info.run_id, "config.yaml", str(tmp_path))).read_text()
        assert "limit_per_split: 60" in config_yaml and f"output: {out}" in config_yaml
    exp = client.get_experiment_by_name("digits")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
