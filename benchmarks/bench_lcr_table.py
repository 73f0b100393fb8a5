"""LCR per mutation operator and rate on digits (seed paper Table 3, plus AUROC and the SPRT).

Run: ``.venv/bin/python benchmarks/bench_lcr_table.py [--quick] [--operators NAI GF] [--rates 0.01 0.02]``.
For every operator × rate: 100 accepted mutants of the digits-cnn (validation accuracy ≥ 0.9 ×
the original's, seeds 0, 1, …), their LCR on the ID test split and on the test part of
``digits-c`` (split by source image as the job splits it), and one Markdown table:

* LCR mean ± std of correct and of wrong predictions (the seed paper's Table 3);
* AUROC of LCR for wrong predictions (ID test has only a handful of errors: read it with the
  error count);
* the SPRT (``specs/conductance_lcr.md``): τ fitted as the job fits it (99% quantile of LCR over
  the correct predictions of the validation part: ID val + the val part of digits-c), applied to
  the digits-c test part with the rule checked after every mutant; mean mutants used (target
  ≤ 35%) and the AUROC of the SPRT estimate c/n, with its signed difference to full LCR.

``--rates`` overrides the default rates of every operator given. A setting whose rejection
sampling hits the cap (10 × 100 tries) is reported as such.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_errors import digits_c_parts, digits_data, sprt_tau

from oodlib.errors.lcr import SPRT, label_change_rate
from oodlib.errors.mutants import generate_mutants, predict
from oodlib.metrics import error_auroc

#: rates per operator: NS needs ⌊n·r⌋ ≥ 2 in a layer of n ≥ 10 neurons (digits-cnn: 16/32/64/8 neurons)
DEFAULT_RATES = {"GF": (0.002, 0.005, 0.01), "NAI": (0.01, 0.02, 0.03), "WS": (0.02, 0.03, 0.05), "NS": (0.04, 0.05, 0.08)}


def mean_std(v: np.ndarray) -> str:
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "–"


def evaluate(model, data, operator: str, rate: float, n_mutants: int, step: int) -> dict:
    """Every column of one table row for ``operator`` at ``rate``."""
    xv, yv, _ = data[("digits", "val")]
    t0 = time.perf_counter()
    try:
        ms = generate_mutants(model, xv, yv, operator, rate, n_accepted=n_mutants)
    except (RuntimeError, ValueError) as exc:
        return {"operator": operator, "rate": rate, "error": str(exc).split(";")[0]}
    patches = ms.patches(model)
    row = {"operator": operator, "rate": rate, "accepted": ms.n_accepted, "rejected": ms.n_rejected,
           "mutant_acc": float(ms.table.val_acc[ms.table.accepted].mean()) / ms.original_val_acc}
    row["tau"], _ = sprt_tau(model, data, patches)
    xc, yc, ids = data[("digits-c", "test")]
    test_c = np.flatnonzero(digits_c_parts(ids) == "test")[::step]
    for name, (x, y) in (("id", data[("digits", "test")][:2]), ("c", (xc[test_c], yc[test_c]))):
        p = predict(model, x)
        res = label_change_rate(model, x, patches, preds=p)
        wrong = p.numpy() != y
        row[f"{name}_n"], row[f"{name}_wrong"] = len(y), int(wrong.sum())
        row[f"{name}_correct_lcr"], row[f"{name}_wrong_lcr"] = mean_std(res.lcr[~wrong]), mean_std(res.lcr[wrong])
        row[f"{name}_auroc"] = error_auroc(wrong, res.lcr) if 0 < wrong.sum() < len(wrong) else float("nan")
    _, used = SPRT(row["tau"]).decide(res.flips)  # on the digits-c test part
    counted = np.arange(res.flips.shape[1])[None, :] < used[:, None]
    row["sprt_used"] = float(used.mean()) / len(patches)
    row["sprt_auroc"] = error_auroc(wrong, (res.flips & counted).sum(1) / used)
    row["seconds"] = time.perf_counter() - t0
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| operator | rate | accepted / rejected | mutant val acc (rel.) | ID test LCR correct | ID test LCR wrong "
            "| ID AUROC (wrong/N) | digits-c LCR correct | digits-c LCR wrong | digits-c AUROC (wrong/N) | SPRT τ "
            "| SPRT mutants used | SPRT AUROC (Δ) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['operator']} | {r['rate']} | {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['operator']} | {r['rate']} | {r['accepted']} / {r['rejected']} | {r['mutant_acc']:.3f} "
            f"| {r['id_correct_lcr']} | {r['id_wrong_lcr']} | {r['id_auroc']:.3f} ({r['id_wrong']}/{r['id_n']}) "
            f"| {r['c_correct_lcr']} | {r['c_wrong_lcr']} | {r['c_auroc']:.3f} ({r['c_wrong']}/{r['c_n']}) | {r['tau']:.3f} "
            f"| {100 * r['sprt_used']:.0f}% | {r['sprt_auroc']:.3f} ({r['sprt_auroc'] - r['c_auroc']:+.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--operators", nargs="+", default=list(DEFAULT_RATES), choices=list(DEFAULT_RATES))
    ap.add_argument("--rates", nargs="+", type=float, help="rates for every operator given (default: per operator)")
    ap.add_argument("--mutants", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="every 4th image of the digits-c test part")
    args = ap.parse_args()
    model, data = digits_data()
    rows = []
    for op in args.operators:
        for rate in args.rates or DEFAULT_RATES[op]:
            rows.append(evaluate(model, data, op, rate, args.mutants, 4 if args.quick else 1))
            print(f"{op} {rate}: {rows[-1].get('seconds', 0):.0f} s", file=sys.stderr, flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
