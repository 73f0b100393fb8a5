"""Compare the last N job runs of one experiment, from the MLflow tracking store only.

    oodlib compare --experiment digits [--last 5] [--per-set] [--threshold 0.01] [--fail-on-regression]
                   [--tracking-uri URI] [--schedule nightly] [--png PATH | --no-png]

Parents are the runs without ``tags.mlflow.parentRunId`` (one per job), newest first by start
time; their children (one per detector, tag ``method``) carry ``{ood_set}.{metric}`` and
``avg.{metric}``. For every detector the table shows avg fpr95 and auroc per run and the delta vs
the previous (older) run; a *regression* is fpr95 up or auroc down by more than ``--threshold``
(absolute, metrics in [0, 1]). With ``--per-set`` every OOD set is shown, compared and gated too.

Exit codes: 0 ok (or regressions without ``--fail-on-regression``); 1 a regression between the
newest and the previous run with ``--fail-on-regression``; 2 unknown experiment / no runs / bad
arguments. Only FINISHED parent runs are compared (a failed or still-running job is skipped).

Pipeline: :func:`fetch_runs` → :func:`tidy_runs` → :func:`compare_runs` → :func:`render_table` /
:func:`oodlib.reporting.trends.plot_trend` / :func:`newest_regressions`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oodlib.reporting.trends import plot_trend

DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"
#: compared metrics and their good direction (+1 higher is better, -1 lower is better)
DIRECTION = {"fpr95": -1, "auroc": +1}
PARENT_TAG = "tags.mlflow.parentRunId"


class CompareError(Exception):
    """A user-facing problem (unknown experiment, no runs, missing store): exit code 2."""


@dataclass
class Fetched:
    """Parent runs (newest first, at most ``last + 1``) and their child runs."""

    uri: str
    experiment: str
    parents: pd.DataFrame
    children: pd.DataFrame


# --- fetch ---


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///outputs/mlflow.db``."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def fetch_runs(uri: str, experiment: str, last: int, schedule: str | None = None) -> Fetched:
    """The newest ``last + 1`` FINISHED parent runs (the extra one gives the oldest shown run a delta)
    and their children. Raises :class:`CompareError` when the store, the experiment or runs are missing."""
    import mlflow
    from mlflow.tracking import MlflowClient

    db = _sqlite_path(uri)
    if db is not None and not db.exists():  # don't let MLflow create an empty store
        raise CompareError(f"tracking store {uri} does not exist (no file {db}); pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if schedule is not None and not re.fullmatch(r"[\w.:-]+", schedule):
        raise CompareError(f"--schedule {schedule!r}: only letters, digits and . _ : - are allowed")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"experiment {experiment!r} not found in {uri} (experiments: {', '.join(known) or 'none'})")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(
            experiment_ids=[exp.experiment_id],
            filter_string=f"tags.schedule = '{schedule}'" if schedule else "",
            order_by=["attributes.start_time DESC"],
            output_format="pandas",
        )
    finally:
        mlflow.set_tracking_uri(previous)
    what = f"experiment {experiment!r}" + (f" with schedule {schedule!r}" if schedule else "")
    if runs.empty:
        raise CompareError(f"{what} has no runs in {uri}")
    if PARENT_TAG not in runs:
        runs[PARENT_TAG] = None
    is_child = runs[PARENT_TAG].notna()
    parents = runs[~is_child & (runs["status"] == "FINISHED")]
    parents = parents.sort_values(["start_time", "run_id"], ascending=False).head(last + 1)
    if parents.empty:
        raise CompareError(f"{what} has no finished job (parent) runs in {uri}")
    children = runs[is_child & runs[PARENT_TAG].isin(parents["run_id"])]
    return Fetched(uri, experiment, parents.reset_index(drop=True), children.reset_index(drop=True))


# --- tidy ---


def tidy_runs(fetched: Fetched) -> pd.DataFrame:
    """One row per (run, method, set, metric): columns ``run_id, run_name, start_time, git_sha, order,
    method, set, metric, value``; ``order`` 0 = newest run."""
    parents = fetched.parents.reset_index(drop=True)
    info = pd.DataFrame({
        "run_id": parents["run_id"],
        "run_name": parents.get("tags.mlflow.runName", pd.Series("", index=parents.index)).fillna(""),
        "start_time": pd.to_datetime(parents["start_time"], utc=True),
        "git_sha": parents.get("tags.git_sha", pd.Series("", index=parents.index)).fillna(""),
        "order": np.arange(len(parents)),
    })
    rows = []
    for child in fetched.children.to_dict("records"):
        method = child.get("tags.method")
        if not isinstance(method, str) or not method:
            method = child.get("tags.mlflow.runName") or child["run_id"][:8]
        for col, value in child.items():
            if not col.startswith("metrics.") or value is None or pd.isna(value):
                continue
            ood_set, _, metric = col[len("metrics.") :].rpartition(".")
            if ood_set:
                rows.append({"run_id": child[PARENT_TAG], "method": method, "set": ood_set, "metric": metric, "value": float(value)})
    values = pd.DataFrame(rows, columns=["run_id", "method", "set", "metric", "value"])
    return info.merge(values, on="run_id", how="inner").sort_values(["method", "set", "metric", "order"]).reset_index(drop=True)


# --- compare ---


def compare_runs(tidy: pd.DataFrame, threshold: float, per_set: bool = False) -> pd.DataFrame:
    """Compared metrics (avg only, or every set with ``per_set``) with ``prev``, ``delta`` (this run −
    the previous older run of the same method/set/metric) and ``regression`` (worse by > threshold)."""
    df = tidy[tidy["metric"].isin(list(DIRECTION))]
    if not per_set:
        df = df[df["set"] == "avg"]
    df = df.sort_values(["method", "set", "metric", "order"]).copy()
    # within a group, rows are newest → oldest: the previous run is the next row, when it is the
    # run right before (a detector missing from the previous run has no delta, not one vs an older run)
    groups = df.groupby(["method", "set", "metric"])
    adjacent = groups["order"].shift(-1) == df["order"] + 1
    df["prev"] = groups["value"].shift(-1).where(adjacent)
    df["delta"] = df["value"] - df["prev"]
    worse = -df["delta"] * df["metric"].map(DIRECTION)  # > 0 means worse
    df["regression"] = (worse > threshold).fillna(False).astype(bool)
    return df.reset_index(drop=True)


def newest_regressions(compared: pd.DataFrame) -> pd.DataFrame:
    """Regressions of the newest run vs the previous one (what ``--fail-on-regression`` gates on)."""
    return compared[(compared["order"] == 0) & compared["regression"]].reset_index(drop=True)


# --- render ---


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or pd.isna(x):
        return "—"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def render_table(compared: pd.DataFrame, last: int, threshold: float) -> str:
    """Text table: per detector, one line per (run, set) newest first with fpr95, Δ, auroc, Δ, flag."""
    shown = compared[compared["order"] < last]
    cell = {(r["method"], r["order"], r["set"], r["metric"]): r for r in shown.to_dict("records")}
    lines = []
    for method in sorted(shown["method"].unique()):
        lines.append(f"== {method} ==")
        lines.append(f"{'run':<10} {'started (UTC)':<19} {'git_sha':<9} {'set':<16} {'fpr95':>7} {'Δfpr95':>8} {'auroc':>7} {'Δauroc':>8}  flag")
        block = shown[shown["method"] == method]
        sets = sorted(block["set"].unique(), key=lambda s: (s != "avg", s))
        for order in sorted(block["order"].unique()):
            for s in sets:
                got = {m: cell.get((method, order, s, m)) for m in DIRECTION}
                if not any(got.values()):
                    continue
                run = next(r for r in got.values() if r)
                val = {m: (r["value"] if r else np.nan) for m, r in got.items()}
                dlt = {m: (r["delta"] if r else np.nan) for m, r in got.items()}
                flags = [m for m, r in got.items() if r and r["regression"]]
                flag = "REGRESSION " + ",".join(flags) if flags else ""
                lines.append(
                    f"{run['run_id'][:8]:<10} {run['start_time']:%Y-%m-%d %H:%M:%S} {str(run['git_sha'])[:8]:<9} {s:<16} "
                    f"{_fmt(val['fpr95']):>7} {_fmt(dlt['fpr95'], True):>8} "
                    f"{_fmt(val['auroc']):>7} {_fmt(dlt['auroc'], True):>8}  {flag}".rstrip()
                )
        lines.append("")
    missing = sorted(set(shown.loc[shown["order"] == 1, "method"]) - set(shown.loc[shown["order"] == 0, "method"]))
    if missing:
        lines.append(f"not in the newest run (in the previous one): {', '.join(missing)}")
    regs = newest_regressions(compared)
    if regs.empty:
        lines.append(f"no regressions of the newest run vs the previous one (threshold {threshold})")
    else:
        lines.append(f"REGRESSIONS of the newest run vs the previous one (threshold {threshold}):")
        for r in regs.itertuples():
            lines.append(f"  {r.method} {r.set}.{r.metric}: {r.prev:.4f} → {r.value:.4f} ({r.delta:+.4f})")
    return "\n".join(lines)


# --- CLI ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the config's `experiment`)")
    parser.add_argument("--last", type=int, default=5, help="number of job runs to show (default 5)")
    parser.add_argument("--per-set", action="store_true", help="also show, compare and gate every OOD set")
    parser.add_argument("--threshold", type=float, default=0.01, help="absolute change counted as a regression (default 0.01)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when the newest run regresses vs the previous")
    parser.add_argument("--tracking-uri", default=None, help=f"default $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI}")
    parser.add_argument("--schedule", default=None, help="only runs with this schedule tag (nightly, manual, …)")
    parser.add_argument("--png", type=Path, default=None, help="trend plot path (default ./compare-<experiment>.png)")
    parser.add_argument("--no-png", action="store_true", help="don't write the trend plot")


def run(args: argparse.Namespace) -> int:
    """Fetch → tidy → compare → render; returns the exit code."""
    if args.last < 1 or args.threshold < 0:
        print("error: --last must be >= 1 and --threshold >= 0", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        fetched = fetch_runs(uri, args.experiment, args.last, args.schedule)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tidy = tidy_runs(fetched)
    if tidy.empty:
        print(f"error: the runs of experiment {args.experiment!r} have no detector (child) runs with metrics", file=sys.stderr)
        return 2
    compared = compare_runs(tidy, args.threshold, args.per_set)
    n_shown = min(args.last, len(fetched.parents))
    sched = f", schedule {args.schedule}" if args.schedule else ""
    print(f"experiment {args.experiment}: last {n_shown} run(s), newest first ({uri}{sched}); Δ = vs the previous run\n")
    print(render_table(compared, args.last, args.threshold))
    if not args.no_png:
        png = args.png or Path(f"compare-{re.sub(r'[^A-Za-z0-9_.-]', '_', args.experiment)}.png")
        plot_trend(compared, args.last, png, DIRECTION, f"{args.experiment}: last {n_shown} run(s)")
        print(f"trend plot: {png}")
    if args.fail_on_regression and not newest_regressions(compared).empty:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oodlib compare", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
