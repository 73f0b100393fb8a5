"""The ``oodlib`` command: run a job, sweep a detector's hyperparameters, report the last run,
compare runs in MLflow. ``python -m jobs.nightly`` (what ``ray job submit`` runs) is ``oodlib run``.

    oodlib run --config configs/digits.yaml [--set KEY=VALUE ...] [--schedule nightly]
    oodlib plan --config configs/imagenet.yaml [--manifest rows.parquet] [--set KEY=VALUE ...]
    oodlib submit --config configs/digits.yaml [--address http://127.0.0.1:8265] [--set KEY=VALUE ...]
    oodlib sweep --config configs/digits.yaml --grid line.delta=0.8,1.0,inf [--set KEY=VALUE ...]
    oodlib verify --config configs/digits.yaml [--repair]
    oodlib gc --config configs/digits.yaml [--keep-runs 7] [--dry-run]
    oodlib report --output outputs --experiment digits
    oodlib monitor --config configs/digits.yaml [--last 14] [--json]
    oodlib compare --experiment digits [--last 5] [--per-set] [--fail-on-regression] ...

Exit codes: 0 done; 1 a failure (or a regression with ``--fail-on-regression``, or an alert from
``monitor``); 2 bad input —
the config (naming the field), the manifest, the weights — reported before any cluster resource
is used. Heavy imports (torch, Ray) happen only in ``run`` and ``sweep``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


from jobs import compare, store
from jobs.config import PROFILES, ConfigError, load_config, parse_overrides, profile_sets


def exit_code(action) -> int:
    """Run ``action``; input problems (config, manifest, weights) print a message and give exit
    code 2 instead of a traceback."""
    from oodlib.data.manifest import ManifestError
    from oodlib.models import WeightsError

    try:
        action()
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"error: model.weights: {exc}", file=sys.stderr)
        return 2
    return 0


def _job_start(args: argparse.Namespace) -> None:
    """Logging (``--verbose``: Ray's INFO progress too) and SIGTERM handling for a job run."""
    from jobs.logs import configure
    from jobs.runtime import exit_on_sigterm

    if args.verbose:
        os.environ["OODLIB_VERBOSE"] = "1"
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before anything imports Ray (it reads this on import)
    configure(args.verbose)
    exit_on_sigterm()


def _cmd_run(args: argparse.Namespace) -> int:
    _job_start(args)
    from jobs import pipeline  # torch/Ray: only for `run`

    sets = [*profile_sets(args.profile), *args.set]
    return exit_code(lambda: pipeline.run(load_config(args.config, parse_overrides(sets)), args.schedule, args.config,
                                          overrides=sets))


def _cmd_plan(args: argparse.Namespace) -> int:
    from jobs import plan  # torch: the calibration

    return exit_code(lambda: plan.cli_plan(args.config, parse_overrides([*profile_sets(args.profile), *args.set]), args.manifest))


def _cmd_sweep(args: argparse.Namespace) -> int:
    _job_start(args)
    from jobs import sweep

    return exit_code(lambda: sweep.run_sweep(load_config(args.config, parse_overrides([*profile_sets(args.profile), *args.set])),
                                             [sweep.parse_axis(a) for a in args.grid], args.config))


def _experiment_root(args: argparse.Namespace) -> Path | None:
    """``{output}/{experiment}`` (its local path, :mod:`jobs.store`) of the command's config, or None
    (message printed) for a bad config."""
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return store.root_path(cfg.output) / cfg.experiment


def _cmd_verify(args: argparse.Namespace) -> int:
    """Hash-check the committed outputs of a config's experiment; 1 when any was damaged."""
    from jobs import storage

    root = _experiment_root(args)
    if root is None:
        return 2
    checked, damaged = storage.verify_tree(root, repair=args.repair)
    for d, found in damaged.items():
        print(f"DAMAGED {store.uri(d)}" + (" (discarded: the next run recomputes it)" if args.repair else ""))
        for line in found:
            print(f"    {line}")
    print(f"verified {checked} committed directories under {store.uri(root)}: {len(damaged)} damaged")
    return 1 if damaged else 0


def _cmd_gc(args: argparse.Namespace) -> int:
    """Delete the cached outputs no kept run references."""
    from jobs import gc

    root = _experiment_root(args)
    if root is None:
        return 2
    if args.keep_runs < 1:
        print("error: --keep-runs must be >= 1", file=sys.stderr)
        return 2
    paths, freed = gc.collect(root, args.keep_runs, dry_run=args.dry_run)
    for p in paths:
        print(("would delete " if args.dry_run else "deleted ") + store.uri(p))
    print(f"{'would free' if args.dry_run else 'freed'} {freed / 2**20:.1f} MiB in {len(paths)} entries under {store.uri(root)} "
          f"(kept the outputs of the newest {args.keep_runs} run(s))")
    return 0


def _add_job_arguments(parser: argparse.ArgumentParser, runs: bool = False) -> None:
    parser.add_argument("--config", required=True, help="job config YAML (e.g. configs/digits.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    if runs:
        parser.add_argument("--verbose", action="store_true", help="also Ray's INFO logs (Ray Data progress) and its harmless warnings")
        parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                            help="a preset of overrides applied before --set (smoke: every stage, small, about a minute)")


def _resolve_stage_path(stage: str, output: Path, experiment: str) -> Path:
    """A stage path from last_run.json: an object-store URI (fetched into the mirror), else as
    written (relative to the job's cwd), else relative to the parent of ``--output``, else re-rooted
    under ``{output}/{experiment}``."""
    from jobs import storage

    if store.is_uri(stage):
        try:
            return storage.fetch(store.local_path(stage))
        except storage.DamagedError:
            return store.local_path(stage)
    p = Path(stage)
    candidates = [p]
    if not p.is_absolute():
        candidates.append(output.parent / p)
        if experiment in p.parts:
            candidates.append(output / Path(*p.parts[p.parts.index(experiment) :]))
    return next((c for c in candidates if c.exists()), p)


def format_summary(summary: dict) -> str:
    """The last_run.json fields a person wants, one per line."""
    lines = [
        f"experiment:    {summary.get('experiment')}",
        f"run id:        {summary.get('run_id')}",
        f"config:        {summary.get('config')} (hash {summary.get('config_hash')})",
        f"model hash:    {summary.get('model_hash')}",
        f"manifest:      {summary.get('manifest')} (hash {summary.get('manifest_hash')})",
        f"MLflow run:    {summary.get('mlflow_run_id')} in {summary.get('tracking_uri')}",
        f"total:         {summary.get('total_seconds')} s",
        "stages:",
    ]
    reused, seconds, stages = summary.get("reused", {}), summary.get("seconds", {}), summary.get("stages", {})
    width = max([len(s) for s in stages] + [8])
    for stage, path in stages.items():
        how = "reused" if reused.get(stage) else "computed"
        lines.append(f"  {stage:<{width}} {how:<8} {seconds.get(stage, '?')!s:>7} s  {path}")
    images = summary.get("images")
    if images:
        lines.append(
            f"images:        {images.get('input')} in, {images.get('features')} embedded, {images.get('quarantined')} quarantined"
        )
    return "\n".join(lines)


def _cmd_report(args: argparse.Namespace) -> int:
    path = store.root_path(args.output) / args.experiment / "last_run.json"
    try:
        summary = json.loads(store.read_bytes(path))
    except FileNotFoundError:
        print(f"error: no {store.uri(path)} (has a job with experiment {args.experiment!r} and output {args.output} run?)",
              file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"error: {store.uri(path)}: not valid JSON ({exc})", file=sys.stderr)
        return 2
    print(f"# last run: {store.uri(path)}\n")
    print(format_summary(summary))
    evaluate = summary.get("stages", {}).get("evaluate")
    if not evaluate:
        print("error: last_run.json has no stages.evaluate path", file=sys.stderr)
        return 1
    results = _resolve_stage_path(evaluate, store.root_path(args.output), args.experiment) / "results.md"
    if not results.exists():
        print(f"error: {results} not found (evaluate stage output removed?)", file=sys.stderr)
        return 1
    print(f"\n# results: {results}\n")
    print(results.read_text().rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oodlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,plan,submit,sweep,verify,gc,report,monitor,compare}")

    p_run = sub.add_parser("run", help="run the job (python -m jobs.nightly)")
    _add_job_arguments(p_run, runs=True)
    p_run.add_argument("--schedule", default=None, help="tag for the MLflow runs (manual, nightly, …)")
    p_run.set_defaults(func=_cmd_run)

    p_plan = sub.add_parser("plan", help="the run's cost plan: rows, passes, bytes, memory, time from a short calibration")
    _add_job_arguments(p_plan)
    p_plan.add_argument("--profile", choices=sorted(PROFILES), default=None, help="a preset of overrides applied before --set")
    p_plan.add_argument("--manifest", default=None, help="row counts from this manifest (else the config's rows / data)")
    p_plan.set_defaults(func=_cmd_plan)

    p_sweep = sub.add_parser("sweep", help="a detector's hyperparameter grid over the stored features (no re-embedding)")
    _add_job_arguments(p_sweep, runs=True)
    p_sweep.add_argument("--grid", action="append", required=True, metavar="DETECTOR.PARAM=v1,v2,…",
                         help="one axis of the grid (repeat for a 2-D grid); inf/off/none switch a step off")
    p_sweep.set_defaults(func=_cmd_sweep)

    p_submit = sub.add_parser("submit", help="run the job on a Ray cluster (Jobs API), outputs and tracking resolved here")
    from jobs import submit

    submit.add_arguments(p_submit)
    p_submit.set_defaults(func=submit.submit)

    p_verify = sub.add_parser("verify", help="hash-check every committed output of the experiment (--repair discards damaged ones)")
    _add_job_arguments(p_verify)
    p_verify.add_argument("--repair", action="store_true", help="discard damaged commits so that the next run recomputes them")
    p_verify.set_defaults(func=_cmd_verify)

    p_gc = sub.add_parser("gc", help="delete cached outputs that no kept run references")
    _add_job_arguments(p_gc)
    p_gc.add_argument("--keep-runs", type=int, default=7, help="keep the outputs of the newest N runs (default 7)")
    p_gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p_gc.set_defaults(func=_cmd_gc)

    p_report = sub.add_parser("report", help="print last_run.json and the results table of the last run")
    p_report.add_argument("--output", default="outputs", help="the config's output: a directory or s3:// / gs:// URI (default outputs)")
    p_report.add_argument("--experiment", required=True, help="the config's experiment")
    p_report.set_defaults(func=_cmd_report)

    p_monitor = sub.add_parser("monitor", help="the incoming batches over the nights and the alert (exit 1 on alert)")
    from jobs import monitor

    monitor.add_arguments(p_monitor)
    p_monitor.set_defaults(func=monitor.run)

    p_compare = sub.add_parser("compare", help="compare the last N runs of an experiment in MLflow")
    compare.add_arguments(p_compare)
    p_compare.set_defaults(func=compare.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "verbose"):  # a job run configures its own logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("faiss").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


def entry(argv: list[str] | None = None) -> None:
    """The ``oodlib`` command (and ``python -m jobs.nightly``): :func:`main`, then a prompt exit."""
    from jobs.runtime import prompt_exit

    prompt_exit(main(argv))


if __name__ == "__main__":
    entry()
