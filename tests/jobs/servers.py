"""Servers the tests start in their own process group (Ray head, MLflow): a free loopback port,
waiting until one answers, and stopping the whole group."""
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

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
