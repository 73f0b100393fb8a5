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

    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    private_token_file()  # the owner-only token file every local job start makes; Ray must accept it
    dash, gcs = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
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
