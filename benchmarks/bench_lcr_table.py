"""LCR per mutation operator and rate on digits (seed paper Table 3, plus AUROC and the SPRT).

Run: ``.venv/bin/python benchmarks/bench_lcr_table.py [--quick] [--operators NAI GF] [--rates 0.01 0.02]``.
For every operator × rate: 100 accepted mutants of the digits-cnn (validation accuracy ≥ 0.9 ×
the original's, seeds 0, 1, …), their LCR on the ID test split and on ``digits-c``, and one
Markdown table:

* LCR mean ± std of correct and of wrong predictions (the seed paper's Table 3);
* AUROC of LCR for wrong predictions (ID test has only a handful of errors: read it with the
  error count); on digits-c also restricted to the corruption levels that do not collapse (where
  the model does not predict one class for ≥ 80% of the images: in a collapsed level a
  "correct" prediction is the collapse class meeting its own label, which no detector can tell
  apart from the wrong ones);
* the SPRT (``specs/conductance_lcr.md``): τ fitted on the LCR of the *correct* ID validation
  predictions (mean + 99% population band, floored at one flip in 100 mutants as the job does),
  applied on digits-c with the rule checked after every mutant; mean mutants used (target ≤ 35%)
  and the AUROC of the SPRT estimate c/n against full LCR (target Δ ≤ 0.01).

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

from bench_errors import digits_data

from oodlib.lcr import SPRT, fit_sprt_tau, label_change_rate
from oodlib.metrics import error_auroc
from oodlib.mutants import generate_mutants, predict

#: rates per operator: NS needs ⌊n·r⌋ ≥ 2 in a layer of n ≥ 10 neurons (digits-cnn: 16/32/64/8 neurons)
DEFAULT_RATES = {"GF": (0.002, 0.005, 0.01), "NAI": (0.01, 0.02, 0.03), "WS": (0.02, 0.03, 0.05), "NS": (0.04, 0.05, 0.08)}
#: a digits-c corruption level is "collapsed" when one class takes ≥ this share of its predictions
COLLAPSED = 0.8


def mean_std(v: np.ndarray) -> str:
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "–"


def collapsed_levels(image_ids, preds: np.ndarray) -> np.ndarray:
    """(N,) bool: the image's corruption level (``digits-c/<level>/<id>``) is collapsed."""
    level = np.array([i.split("/")[1] for i in image_ids])
    out = np.zeros(len(level), bool)
    for lv in np.unique(level):
        sel = level == lv
        out[sel] = np.bincount(preds[sel]).max() >= COLLAPSED * sel.sum()
    return out


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
    pv = predict(model, xv)
    lcr_v = label_change_rate(model, xv, patches, preds=pv).lcr
    tau = max(fit_sprt_tau(lcr_v[pv.numpy() == yv]), 1.0 / len(patches))
    row["tau"] = tau
    for name, key, stride in (("id", ("digits", "test"), 1), ("c", ("digits-c", "test"), step)):
        x, y, ids = data[key]
        x, y = x[::stride], y[::stride]
        p = predict(model, x)
        res = label_change_rate(model, x, patches, preds=p)
        wrong = p.numpy() != y
        row[f"{name}_n"], row[f"{name}_wrong"] = len(y), int(wrong.sum())
        row[f"{name}_correct_lcr"], row[f"{name}_wrong_lcr"] = mean_std(res.lcr[~wrong]), mean_std(res.lcr[wrong])
        row[f"{name}_auroc"] = error_auroc(wrong, res.lcr) if 0 < wrong.sum() < len(wrong) else float("nan")
        if name == "c":
            keep = ~collapsed_levels(ids[::stride], p.numpy())
            row["c_auroc_kept"] = error_auroc(wrong[keep], res.lcr[keep])
            sprt = SPRT(min(tau, 0.9 / 1.1 - 1e-6))
            _, used = sprt.decide(res.flips)
            counted = np.arange(res.flips.shape[1])[None, :] < used[:, None]
            row["sprt_used"] = float(used.mean()) / len(patches)
            row["sprt_auroc"] = error_auroc(wrong, (res.flips & counted).sum(1) / used)
    row["seconds"] = time.perf_counter() - t0
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| operator | rate | accepted / rejected | mutant val acc (rel.) | ID test LCR correct | ID test LCR wrong "
            "| ID AUROC (wrong/N) | digits-c LCR correct | digits-c LCR wrong | digits-c AUROC (uncollapsed) | SPRT τ "
            "| SPRT mutants used | SPRT AUROC (Δ) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['operator']} | {r['rate']} | {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['operator']} | {r['rate']} | {r['accepted']} / {r['rejected']} | {r['mutant_acc']:.3f} "
            f"| {r['id_correct_lcr']} | {r['id_wrong_lcr']} | {r['id_auroc']:.3f} ({r['id_wrong']}/{r['id_n']}) "
            f"| {r['c_correct_lcr']} | {r['c_wrong_lcr']} | {r['c_auroc']:.3f} ({r['c_auroc_kept']:.3f}) | {r['tau']:.3f} "
            f"| {100 * r['sprt_used']:.0f}% | {r['sprt_auroc']:.3f} ({abs(r['sprt_auroc'] - r['c_auroc']):.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--operators", nargs="+", default=list(DEFAULT_RATES), choices=list(DEFAULT_RATES))
    ap.add_argument("--rates", nargs="+", type=float, help="rates for every operator given (default: per operator)")
    ap.add_argument("--mutants", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="every 4th digits-c image")
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
