"""MLflow tracking, from the driver only: one parent run per job, child runs per stage result
(one per detector, error method, long-tail variant, explanation).

Child runs carry params (hyperparameters) and metrics ``{dataset}.{metric}`` / ``avg.{metric}``;
large tables go in as Parquet artifacts, plots as PNG artifacts. Children are tagged explicitly
with the parent's tags (MLflow does not inherit them).
"""
from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID


def tracking_uri(configured: str | None, output: Path) -> str:
    """Configured URI, else ``$MLFLOW_TRACKING_URI``, else SQLite in the output directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    output.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{output.resolve() / 'mlflow.db'}"


#: query parameters that carry credentials (libpq, SQLAlchemy URLs, cloud signed URLs)
SECRET_PARAMS = {"password", "passwd", "pwd", "secret", "token", "access_token", "sslpassword", "sig", "signature",
                 "x-amz-signature", "x-amz-security-token", "x-goog-signature", "api_key", "apikey", "key"}


def redact_uri(uri: str | None) -> str | None:
    """A URI with its secrets masked (``***``): the password of the user-info part, with or without
    a user name (``postgresql://user:secret@h/db``, ``postgresql://:secret@h/db``), and the values of
    credential query parameters (``?password=secret``). Tracking URIs are printed and written to
    last_run.json and MLflow; passwords never are."""
    if not uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(uri)
    out = uri
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        if ":" in userinfo:
            out = out.replace(parts.netloc, userinfo.split(":", 1)[0] + ":***@" + host, 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*/:")
            out = out.replace("?" + parts.query, "?" + query, 1)
    return out


def git_sha() -> str:
    """The code's git commit: ``$OODLIB_GIT_SHA`` (set by ``oodlib submit``: a Ray job's package
    copy has no ``.git``), else ``git rev-parse``, else ``unknown``."""
    if os.environ.get("OODLIB_GIT_SHA"):
        return os.environ["OODLIB_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing (a concurrent creator wins the race)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"embed.batch_size": "256", …}`` (lists as JSON,
    values cut to MLflow's 6000 characters)."""
    import json

    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text if len(text) <= 6000 else text[:5990] + " …(cut)"
    return out


def log_run(
    client: MlflowClient, exp_id: str, name: str, tags: dict[str, str], params: dict | None = None,
    metrics: dict[str, float] | None = None, artifacts: list[Path] = (), parent_id: str | None = None,
) -> str:
    """One run: tags, params, metrics and artifacts in as few store calls as MLflow's
    batch limits allow (100 params, 1000 metrics a call); a child when ``parent_id`` is given.
    The run is left RUNNING for the caller to terminate. Returns its id."""
    tags = {**tags, **({MLFLOW_PARENT_RUN_ID: parent_id} if parent_id else {})}
    run_id = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    stamp = int(time.time() * 1000)
    for chunk in _chunks([Param(k, str(v)) for k, v in (params or {}).items()], 100):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([Metric(k, float(v), stamp, 0) for k, v in (metrics or {}).items()], 1000):
        client.log_batch(run_id, metrics=chunk)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    return run_id


class Tracker:
    """The MLflow side of one job. The parent run is created when the first stage is done (so a
    job refused for bad input leaves no run) and stays RUNNING while stages add their child runs
    and seconds; it ends FINISHED with the summary, or FAILED when the job fails. ``uri`` None
    disables tracking (every method is then a no-op).

    The store calls run in order on one background thread, so the stages do not wait for them (a
    fresh SQLite store takes seconds to open: MLflow migrates its schema); an error there fails the
    job at the next call, and :meth:`finish` returns once everything is logged."""

    def __init__(self, uri: str | None, experiment: str, tags: dict[str, str], params: dict, config_yaml: str = "") -> None:
        self.uri, self.experiment, self.tags, self.params, self.config_yaml = uri, experiment, tags, params, config_yaml
        self.parent: str | None = None
        self._queue = ThreadPoolExecutor(1, thread_name_prefix="mlflow") if uri is not None else None
        self._pending: list[Future] = []
        self._later(self._open)  # while the first stages run

    def _later(self, call, *args) -> None:
        """Queue a store call; first raise the error of any queued call that failed."""
        if self._queue is None:
            return
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            f.result()
        self._pending.append(self._queue.submit(call, *args))

    def _drain(self) -> None:
        """Wait for every queued call; raise the first error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def _open(self) -> None:
        self.client = MlflowClient(self.uri)
        self.exp_id = experiment_id(self.client, self.experiment)
        # MLflow 3 opens an experiment without a kind on its GenAI traces page; this one is a model's
        self.client.set_experiment_tag(self.exp_id, "mlflow.experimentKind", "custom_model_development")

    def parent_id(self) -> str | None:
        """The parent run's id (created now if no stage created it yet); None without tracking."""
        if self.uri is None:
            return None
        self._drain()
        return self._start()

    def _start(self) -> str:
        if self.parent is None:
            run_name = f"{self.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.parent = log_run(self.client, self.exp_id, run_name, resolve_tags(self.tags), params=self.params)
            if self.config_yaml:
                self.client.log_text(self.parent, self.config_yaml, "config.yaml")
        return self.parent

    def stage(self, name: str, seconds: float, children: list) -> None:
        """A finished stage: its seconds on the parent, its child runs (:class:`jobs.stages.base.Child`)."""
        self._later(self._log_stage, name, seconds, children)

    def _log_stage(self, name: str, seconds: float, children: list) -> None:
        parent = self._start()
        self.client.log_metric(parent, f"stage_seconds.{name}", seconds)
        for c in children:
            child = log_run(self.client, self.exp_id, c.name, {**self.tags, "method": c.method or c.name}, c.params, c.metrics,
                            c.artifacts, parent_id=parent)
            self.client.set_terminated(child)

    def steps(self, series: list[tuple[str, float, int]]) -> None:
        """Metrics (key, value, step) on the parent, e.g. a flag rate per batch at step YYYYMMDD."""
        if series:
            self._later(self._log_steps, series)

    def _log_steps(self, series: list[tuple[str, float, int]]) -> None:
        stamp = int(time.time() * 1000)
        for chunk in _chunks([Metric(k, v, stamp, step) for k, v, step in series], 1000):
            self.client.log_batch(self._start(), metrics=chunk)

    def finish(self, metrics: dict[str, float], artifacts: list[Path], summary: dict) -> None:
        """Parent metrics, artifacts and ``run_summary.json``; the parent ends FINISHED. Returns once
        every call of the job is in the store."""
        if self.uri is None:
            return
        self._drain()
        parent = self._start()
        stamp = int(time.time() * 1000)
        for chunk in _chunks([Metric(k, float(v), stamp, 0) for k, v in metrics.items()], 1000):
            self.client.log_batch(parent, metrics=chunk)
        for path in artifacts:
            self.client.log_artifact(parent, str(path))
        self.client.log_dict(parent, summary, "run_summary.json")
        self.client.set_terminated(parent)
        self._queue.shutdown()

    def fail(self) -> None:
        """The parent (if any) ends FAILED, after the calls already queued (their errors ignored: the job is failing anyway)."""
        if self._queue is None:
            return
        for f in self._pending:
            f.exception()
        self._queue.shutdown()
        if self.parent is not None:
            self.client.set_terminated(self.parent, "FAILED")
