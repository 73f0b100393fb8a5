"""cluster/nightly.sh against a fake `ray` executable placed first on PATH (no cluster).

The fake answers `ray job status` with the exact text Ray 2.60's CLI prints for each status
(captured from Ray's own `_log_job_status` below), so the script's parser is tested against the
real format, not a made-up one.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "nightly.sh"
STATUSES = ["PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]
JOB_ID = "@ID@"  # placeholder the fake replaces with the queried submission id

_CAPTURE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from types import SimpleNamespace
    from ray.autoscaler._private.cli_logger import cli_logger
    from ray.dashboard.modules.job import cli as job_cli
    from ray.job_submission import JobStatus

    out = {}
    for style in ("record", "pretty"):
        cli_logger.configure(log_style=style, color_mode="false")
        for status in JobStatus:
            info = SimpleNamespace(status=status, message="Job entrypoint command failed" if status == "FAILED" else None)
            client = SimpleNamespace(get_job_info=lambda job_id, info=info: info)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                job_cli._log_job_status(client, sys.argv[1])
            out[f"{style}:{status.value}"] = buf.getvalue()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def ray_status_outputs():
    """{'record:SUCCEEDED': text, 'pretty:STOPPED': text, ...} as printed by Ray's `ray job status`."""
    res = subprocess.run([sys.executable, "-c", _CAPTURE, JOB_ID], capture_output=True, text=True,
                         timeout=60, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {f"{s}:{st}" for s in ("record", "pretty") for st in STATUSES}
    assert all(JOB_ID in text for text in out.values())
    return out


FAKE_RAY = r"""#!/usr/bin/env bash
# fake `ray`: records every call, answers from files in $FAKE_RAY_STATE
st="$FAKE_RAY_STATE"
n=$(( $(cat "$st/ncalls" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$st/ncalls"
printf '%s\n' "$@" > "$st/call.$n.args"
printf 'RAY_AUTH_MODE=%s\nRAY_ADDRESS=%s\nPWD=%s\n' "${RAY_AUTH_MODE-<unset>}" "${RAY_ADDRESS-<unset>}" "$PWD" > "$st/call.$n.env"
id="${!#}"
case "$1 $2" in
  "job submit")
    m=$(( $(cat "$st/nsubmits" 2>/dev/null || echo 0) + 1 )); echo "$m" > "$st/nsubmits"
    rc=$(sed -n "${m}p" "$st/submit_rcs"); rc=${rc:-0}
    if [ "$rc" != 0 ]; then echo "RuntimeError: Request failed with status code 500" >&2; exit "$rc"; fi
    prev=""; for a in "$@"; do [ "$prev" = "--submission-id" ] && sid="$a"; prev="$a"; done
    touch "$st/submitted"
    echo "Job '$sid' submitted successfully"
    exit 0 ;;
  "job status")
    if [ ! -e "$st/submitted" ]; then
      echo "RuntimeError: Request failed with status code 404: Job $id does not exist." >&2; exit 1
    fi
    k=$(( $(cat "$st/npolls" 2>/dev/null || echo 0) + 1 )); echo "$k" > "$st/npolls"
    total=$(wc -l < "$st/statuses")
    [ "$k" -gt "$total" ] && k=$total
    s=$(sed -n "${k}p" "$st/statuses")
    if [ "$s" = ERROR ]; then echo "ConnectionError: cannot reach the dashboard" >&2; exit 1; fi
    sed "s/@ID@/$id/g" "$st/out.$s"
    exit 0 ;;
  "job logs")
    for i in $(seq 1 300); do echo "driver log line $i"; done
    exit 0 ;;
  "job stop")
    echo "Attempting to stop job '$id'"; exit 0 ;;
esac
echo "fake ray: unexpected call: $*" >&2
exit 99
"""


FAKE_OODLIB = r"""#!/usr/bin/env bash
# fake `oodlib`: `oodlib submit ARGS` is recorded by the fake ray as `ray job submit ARGS`
[ "$1" = submit ] || { echo "fake oodlib: unexpected call: $*" >&2; exit 99; }
shift
exec ray job submit "$@"
"""


class Fake:
    def __init__(self, tmp_path: Path, outputs: dict, style: str = "record"):
        self.bin = tmp_path / "bin"
        self.state = tmp_path / "state"
        self.project = tmp_path / "project"
        for d in (self.bin, self.state, self.project / "configs"):
            d.mkdir(parents=True)
        for name, text in (("ray", FAKE_RAY), ("oodlib", FAKE_OODLIB)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        (self.project / "configs" / "digits.yaml").write_text("name: digits\n")
        (self.project / "configs" / "imagenet.yaml").write_text("name: imagenet\n")
        for st in STATUSES:
            (self.state / f"out.{st}").write_text(outputs[f"{style}:{st}"])

    def run(self, statuses, *args, submitted=False, submit_rcs=(0,), **env):
        (self.state / "statuses").write_text("\n".join(statuses) + "\n")
        (self.state / "submit_rcs").write_text("".join(f"{rc}\n" for rc in submit_rcs))
        if submitted:
            (self.state / "submitted").touch()
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("RAY_", "SUBMISSION_ID", "CONFIG", "POLL_", "OODLIB_"))}
        full_env = {**base, "PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_RAY_STATE": str(self.state),
                    "OODLIB_WORKDIR": str(self.project), "POLL_INTERVAL_S": "0",
                    "SUBMIT_RETRY_DELAY_S": "0", **env}
        self.before = dt.datetime.now(dt.timezone.utc).date()
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True,
                              timeout=30)
        self.after = dt.datetime.now(dt.timezone.utc).date()
        return proc

    def calls(self):
        n = int((self.state / "ncalls").read_text()) if (self.state / "ncalls").exists() else 0
        out = []
        for i in range(1, n + 1):
            args = (self.state / f"call.{i}.args").read_text().splitlines()
            env = dict(l.split("=", 1) for l in (self.state / f"call.{i}.env").read_text().splitlines())
            out.append((args, env))
        return out

    def calls_of(self, sub):
        return [(a, e) for a, e in self.calls() if a[:2] == ["job", sub]]


def _opt(args, name):
    return args[args.index(name) + 1]


@pytest.fixture
def fake(tmp_path, ray_status_outputs):
    return Fake(tmp_path, ray_status_outputs)


# ----------------------------------------------------------------------------------------------


def test_succeeded_exits_zero_with_dated_submission_id(fake):
    proc = fake.run(["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"])
    assert proc.returncode == 0, proc.stdout + proc.stderr

    (submit_args, submit_env), = fake.calls_of("submit")
    sid = _opt(submit_args, "--submission-id")
    assert re.fullmatch(r"nightly-\d{4}-\d{2}-\d{2}", sid)
    assert sid in {f"nightly-{fake.before.isoformat()}", f"nightly-{fake.after.isoformat()}"}  # UTC date
    assert "--no-wait" in submit_args
    assert _opt(submit_args, "--working-dir") == "."
    assert _opt(submit_args, "--address") == "http://127.0.0.1:8265"
    assert _opt(submit_args, "--config") == "configs/digits.yaml" and _opt(submit_args, "--schedule") == "nightly"
    assert _opt(submit_args, "--attempts") == "1"  # this script retries itself
    # token auth exported to ray, and `--working-dir .` is the project directory
    assert submit_env["RAY_AUTH_MODE"] == "token"
    assert Path(submit_env["PWD"]).resolve() == fake.project.resolve()

    polls = fake.calls_of("status")
    assert len(polls) == 1 + 4  # existence check before submitting, then one poll per status
    assert all(a[-1] == sid and e["RAY_AUTH_MODE"] == "token" for a, e in polls)
    assert fake.calls_of("logs") and "driver log line 300" in proc.stdout
    assert "driver log line 1\n" not in proc.stdout  # only the tail is printed
    assert not fake.calls_of("stop")


def test_stopped_job_is_not_success_even_though_submit_exits_zero(fake):
    proc = fake.run(["RUNNING", "STOPPED"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(fake.calls_of("submit")) == 1  # the submission itself succeeded (exit 0)
    assert "STOPPED" in proc.stdout


def test_failed_job_exits_one(fake):
    proc = fake.run(["PENDING", "FAILED"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "driver log line 300" in proc.stdout


def test_pretty_log_style_is_parsed_too(tmp_path, ray_status_outputs):
    fake = Fake(tmp_path, ray_status_outputs, style="pretty")
    assert fake.run(["RUNNING", "SUCCEEDED"]).returncode == 0
    assert fake.run(["STOPPED"], submitted=True).returncode == 2


def test_poll_timeout_stops_the_job(fake):
    proc = fake.run(["RUNNING"], POLL_TIMEOUT_S="1", POLL_INTERVAL_S="0.2")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    (stop_args, _), = fake.calls_of("stop")
    assert stop_args[-1] == _opt(fake.calls_of("submit")[0][0], "--submission-id")
    assert "timeout" in proc.stdout


def test_poll_timeout_without_stop(fake):
    proc = fake.run(["PENDING"], POLL_TIMEOUT_S="0", STOP_ON_TIMEOUT="0")
    assert proc.returncode == 3
    assert not fake.calls_of("stop")


def test_env_overrides_and_config_argument(fake):
    proc = fake.run(["SUCCEEDED"], "configs/imagenet.yaml", SUBMISSION_ID="nightly-imagenet-rerun",
                    RAY_ADDRESS="http://127.0.0.1:18265")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (args, env), = fake.calls_of("submit")
    assert _opt(args, "--submission-id") == "nightly-imagenet-rerun"
    assert _opt(args, "--address") == "http://127.0.0.1:18265" == env["RAY_ADDRESS"]
    assert _opt(args, "--config") == "configs/imagenet.yaml"


def test_invalid_config_is_not_retried(fake):
    proc = fake.run(["SUCCEEDED"], submit_rcs=(2, 0, 0), SUBMIT_ATTEMPTS="3")
    assert proc.returncode == 64 and len(fake.calls_of("submit")) == 1
    assert "invalid" in proc.stdout


def test_existing_submission_is_watched_not_resubmitted(fake):
    proc = fake.run(["SUCCEEDED"], submitted=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.calls_of("submit") == []
    assert "exists (status SUCCEEDED)" in proc.stdout and "not resubmitting" in proc.stdout


def test_submit_failure_is_retried_then_nonzero_without_polling(fake):
    proc = fake.run(["SUCCEEDED"], submit_rcs=(1, 1, 1), SUBMIT_ATTEMPTS="3")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert len(fake.calls_of("submit")) == 3
    assert len(fake.calls_of("status")) == 3  # only the existence checks before each attempt


def test_transient_submit_failure_then_success(fake):
    # e.g. "No available agent to submit job" while a fresh cluster's dashboard agent starts
    proc = fake.run(["RUNNING", "SUCCEEDED"], submit_rcs=(1, 0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = {_opt(a, "--submission-id") for a, _ in fake.calls_of("submit")}
    assert len(fake.calls_of("submit")) == 2 and len(ids) == 1  # same idempotency key both times


def test_transient_status_errors_are_tolerated_then_fatal(fake):
    assert fake.run(["ERROR", "ERROR", "SUCCEEDED"], MAX_STATUS_ERRORS="3").returncode == 0
    for f in fake.state.glob("*"):  # fresh run: forget calls and the submission
        if f.name.startswith(("call.", "ncalls", "npolls", "nsubmits", "submitted")):
            f.unlink()
    proc = fake.run(["ERROR"], MAX_STATUS_ERRORS="3")
    assert proc.returncode == 4
    assert len(fake.calls_of("status")) == 1 + 3


@pytest.mark.parametrize("env, arg", [
    ({"SUBMISSION_ID": "nightly 2025/01/01"}, None),
    ({"POLL_TIMEOUT_S": "soon"}, None),
    ({"SUBMIT_ATTEMPTS": "0"}, None),
    ({}, "configs/missing.yaml"),
])
def test_bad_settings_fail_before_contacting_the_cluster(fake, env, arg):
    proc = fake.run(["SUCCEEDED"], *([arg] if arg else []), **env)
    assert proc.returncode == 64, proc.stdout + proc.stderr
    assert fake.calls() == []


def test_default_working_dir_is_the_repository_root(fake, tmp_path):
    # without OODLIB_WORKDIR the project is the parent of cluster/; pyproject.toml stands in for a config
    proc = fake.run(["SUCCEEDED"], "pyproject.toml", OODLIB_WORKDIR="")  # empty = unset
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (_, submit_env), = fake.calls_of("submit")
    assert Path(submit_env["PWD"]).resolve() == ROOT


@pytest.mark.parametrize("style", ["record", "pretty"])
def test_parse_status_matches_ray_output(ray_status_outputs, style, tmp_path):
    """The script's parser maps Ray 2.60's own `ray job status` text back to the status."""
    for status in STATUSES:
        text = ray_status_outputs[f"{style}:{status}"].replace(JOB_ID, "nightly-2025-01-01")
        res = subprocess.run(["bash", "-c", f'source "{SCRIPT}"; parse_status'], input=text,
                             capture_output=True, text=True, timeout=10)
        assert res.stdout.strip() == status, (status, text)
    colored = "\x1b[32mJob 'nightly-2025-01-01' succeeded\x1b[0m\n"
    res = subprocess.run(["bash", "-c", f'source "{SCRIPT}"; parse_status'], input=colored,
                         capture_output=True, text=True, timeout=10)
    assert res.stdout.strip() == "SUCCEEDED"
    res = subprocess.run(["bash", "-c", f'source "{SCRIPT}"; parse_status'], input="garbage\n",
                         capture_output=True, text=True, timeout=10)
    assert res.stdout.strip() == "UNKNOWN"


def test_script_is_executable_and_valid_bash():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=10).returncode == 0
