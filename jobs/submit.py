"""``oodlib submit``: run the job on a Ray cluster through its Jobs API, so that its outputs and
its MLflow runs land where the submitter means them to — not in Ray's per-job package copy.

    oodlib submit --config configs/digits.yaml [--address http://127.0.0.1:8265] [--set KEY=VALUE …]
                  [--schedule nightly] [--submission-id nightly-2026-12-01] [--no-wait]

On the submitting side it validates the config (exit 2 before the cluster is contacted; an
object-store output must be writable), resolves ``output`` to an absolute path (a URI stays as
it is) and the tracking URI (the config's, ``$MLFLOW_TRACKING_URI``, else SQLite in a local output
directory), records the git sha, and submits ``python -m jobs.nightly`` with those as ``--set``
overrides and, in the runtime env, the git sha and — for an object-store output — the store's
variables that are set here (:data:`jobs.store.STORE_ENV`: endpoint, credentials, region; their
names are printed, never their values) (token auth: the token file or ``$RAY_AUTH_TOKEN``). It then streams the job's logs and exits 0 only when the job SUCCEEDED
(1 FAILED or STOPPED, 2 bad input, 4 the cluster could not be reached or refused the job).
The raw equivalent is in the README ("Submitting to Ray").
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from jobs import store
from jobs.config import ConfigError, JobConfig, load_config, parse_overrides, profile_sets

#: never uploaded with the working directory (outputs, environments, caches)
EXCLUDES = [".venv/", "outputs/", "mlruns/", "*.db", ".git/", "__pycache__/", ".pytest_cache/", "*.egg-info/"]


def resolved_overrides(cfg: JobConfig, working_dir: Path) -> dict[str, str]:
    """``--set`` values that pin the job's locations on the submitting side: an absolute
    ``output`` (or its URI) and an explicit tracking URI (SQLite paths made absolute). With an
    object-store output and no tracking URI, MLflow's SQLite file stays in the job's node-local
    mirror of the output (:mod:`jobs.store`): no tracking override (set a tracking server)."""
    if store.is_uri(cfg.output):
        output, default = cfg.output, None
    else:
        output = Path(cfg.output)
        output = str(output if output.is_absolute() else (Path.cwd() / output).resolve())
        default = f"sqlite:///{Path(output) / 'mlflow.db'}"
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    return {"output": output, **({"mlflow.tracking_uri": uri} if uri else {})}


def store_env(cfg: JobConfig) -> dict[str, str]:
    """The object-store variables set here that the job's nodes need (none for a local output)."""
    return {k: os.environ[k] for k in store.STORE_ENV if os.environ.get(k)} if store.is_uri(cfg.output) else {}


def config_for_job(config: str, working_dir: Path) -> str:
    """The config path as the job sees it: relative to the uploaded working directory, or absolute."""
    path = Path(config).resolve()
    try:
        return path.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def entrypoint(config: str, overrides: list[str], schedule: str | None) -> str:
    args = ["python", "-m", "jobs.nightly", "--config", config]  # the cluster's python
    for item in overrides:
        args += ["--set", item]
    if schedule:
        args += ["--schedule", schedule]
    return shlex.join(args)


def submit(args: argparse.Namespace) -> int:
    """Validate, resolve, submit, stream the logs, report the outcome (see the module docstring)."""
    from jobs.tracking import git_sha

    working_dir = Path(args.working_dir).resolve()
    args.set = [*profile_sets(args.profile), *args.set]
    try:
        user_sets = parse_overrides(args.set)
        cfg = load_config(args.config, user_sets)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pinned = resolved_overrides(cfg, working_dir)
    overrides = [*args.set, *(f"{k}={v}" for k, v in pinned.items())]
    command = entrypoint(config_for_job(args.config, working_dir), overrides, args.schedule)
    passed = store_env(cfg)
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES,
                   "env_vars": {"OODLIB_GIT_SHA": git_sha(), "RAY_AUTH_MODE": "token", **passed}}
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobStatus, JobSubmissionClient

    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)  # packaging chatter
    for attempt in range(1, args.attempts + 1):
        try:
            client = JobSubmissionClient(args.address)
            job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=args.submission_id)
            break
        except Exception as exc:  # connection refused, no agent yet, bad token, a submission id in use …
            transient = "try again" in str(exc) or isinstance(exc, ConnectionError)
            if not transient or attempt == args.attempts:
                print(f"error: cannot submit to {args.address}: {exc}", file=sys.stderr)
                return 4
            print(f"[submit] {exc} — retry {attempt}/{args.attempts - 1} in {args.retry_delay_s:g} s", file=sys.stderr, flush=True)
            time.sleep(args.retry_delay_s)
    print(f"[submit] {job_id}: {command}\n[submit] outputs {pinned['output']}, "
          f"tracking {pinned.get('mlflow.tracking_uri') or '(SQLite in the job node mirror; set a server)'}"
          + (f"\n[submit] passing {', '.join(sorted(passed))} from this environment (values not shown)" if passed else ""),
          flush=True)
    if args.no_wait:
        return 0

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except Exception as exc:  # the log stream broke; the status below still decides
        print(f"[submit] log stream ended: {exc}", file=sys.stderr)
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(2)
        status = client.get_job_status(job_id)
    print(f"[submit] {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job config YAML, inside the working directory or absolute")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                        help="Ray Jobs API (default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--working-dir", default=".", help="directory uploaded as the job's code (default .)")
    parser.add_argument("--schedule", default=None, help="tag for the MLflow runs (manual, nightly, …)")
    parser.add_argument("--submission-id", default=None, help="idempotency key (Ray refuses a reused id)")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit 0 without waiting")
    parser.add_argument("--profile", default=None, help="a preset of overrides (see `oodlib run --help`)")
    parser.add_argument("--attempts", type=int, default=5, help="submission attempts while the cluster is starting (default 5)")
    parser.add_argument("--retry-delay-s", type=float, default=5.0, help="seconds between attempts (default 5)")
