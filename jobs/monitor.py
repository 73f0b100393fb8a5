"""``oodlib monitor``: the incoming batches over the nights and tonight's alert, from the published
``batches`` table (no Ray, no torch) — exit 1 when the newest batch of an incoming dataset alerts,
so that cron or a CI step can page someone.

    oodlib monitor --config configs/digits.yaml [--last 14] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from jobs import store
from jobs.config import ConfigError, load_config, parse_overrides
from jobs.report import decisions, read_published


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job config YAML (its output and experiment say where the tables are)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--last", type=int, default=14, help="show the newest N batches per incoming dataset (default 14)")
    parser.add_argument("--json", action="store_true", help="print the newest decisions as JSON instead of the tables")


def _pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def history_table(rows: pd.DataFrame, decided: list) -> str:
    """The batches of one dataset as a markdown table (rates in percent), with each one's decision."""
    fire = {d.batch: d.fire for d in decided}
    lines = ["| batch | images | flagged | rate (%) | 95% CI (%) | OOD rate (%) | c2st p | KS p | expected (%) | alert |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows.itertuples(index=False):
        lines.append(f"| {r.batch} | {r.n} | {r.k} | {_pct(r.rate)} | [{_pct(r.lo)}, {_pct(r.hi)}] | {_pct(r.ood_rate)} | "
                     f"{r.c2st_p:.3g} | {r.ks_p:.3g} | {_pct(r.expected_rate)} | {'ALERT' if fire.get(str(r.batch)) else 'ok'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.last < 1:
        print("error: --last must be >= 1", file=sys.stderr)
        return 2
    root = store.root_path(cfg.output) / cfg.experiment
    history = read_published(root / "tables" / "batches")
    if history is None or history.empty:
        print(f"error: no batches table in {store.uri(root / 'tables')} — has a run with verdicts.enabled and data.incoming_datasets "
              "published one?", file=sys.stderr)
        return 2
    by_dataset = decisions(history, cfg.verdicts.margin, cfg.verdicts.alpha)
    newest = {d: ds[-1] for d, ds in by_dataset.items()}
    if args.json:
        print(json.dumps({"fire": any(d.fire for d in newest.values()),
                          "datasets": {k: d.to_dict() for k, d in newest.items()}}, indent=2, allow_nan=False))
    else:
        for dataset, decided in by_dataset.items():
            rows = history[history.dataset == dataset].sort_values("batch").tail(args.last)
            print(f"# {dataset}: {len(history[history.dataset == dataset])} batches (newest {len(rows)} shown)\n")
            print(history_table(rows, decided))
            print(f"\n{newest[dataset].reason}\n")
        reports = sorted(rel for rel in store.listing(root / "reports") if Path(rel).name.startswith("report-"))
        if reports:
            print(f"report: {store.uri(root / 'reports' / reports[-1])}")
    return 1 if any(d.fire for d in newest.values()) else 0
