"""Wrong-prediction detection benchmark (issue 4): conductance vs Captum, batched LCR, SPRT.

Run: ``.venv/bin/python benchmarks/bench_errors.py [--quick] [--operator NAI --rate 0.02]``.
Prints one Markdown table with the measured ratios, the targets and PASS/FAIL:

* conductance ≥ 1.3× faster than Captum ``LayerConductance`` at the same n, layer, batch and
  values (ours ``left_riemann`` = Captum ``riemann_trapezoid``, ours ``gausslegendre`` = Captum's
  default), on the digits model and resnet18 (random weights, 64 px); plus the embed-stage view:
  our paper-rule ``conductance_forward`` (conductance + logits + features in one call) against
  the ordinary forward + Captum;
* LCR with 100 accepted mutants ≤ 1.2× the time of 100 plain forwards of the same batch, and
  the speed-up over one-image-at-a-time mutant evaluation (measured on a subset, per image×mutant);
* SPRT on digits-c: mean mutants per input ≤ 35% of 100 at an AUROC within 0.01 of full LCR
  (τ from the correct predictions of the validation part).
Timings: interleaved repeats, median (the machine is shared).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oodlib.conductance import conductance_forward, layer_conductance  # noqa: E402
from oodlib.error_detection import group_split  # noqa: E402
from oodlib.lcr import SPRT, fit_sprt_tau, label_change_rate  # noqa: E402
from oodlib.metrics import error_auroc  # noqa: E402
from oodlib.mutants import applied, generate_mutants, predict  # noqa: E402


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable, runs interleaved (one warm-up each)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def digits_data():
    from oodlib.data.decode import decode_batch
    from oodlib.data.digits import build_digits
    from oodlib.data.manifest import encode_png
    from oodlib.models.digits_cnn import trained_digits_cnn

    model = trained_digits_cnn()
    out = {}
    for s in build_digits(0):
        x, _ = decode_batch([encode_png(im) for im in s.images], [None] * len(s.images), model.preprocess)
        out[(s.dataset, s.split)] = (x, np.asarray(s.labels), s.image_ids)
    return model, out


def bench_conductance(name, model, x, n_steps, repeats, rows):
    from captum.attr import LayerConductance

    target = model(x).argmax(1)
    lc = LayerConductance(model, model.layer())
    pairs = {"left_riemann": "riemann_trapezoid", "gausslegendre": "gausslegendre"}
    for ours, theirs in pairs.items():
        a = layer_conductance(model, x, n_steps=n_steps, method=ours, target=target)
        b = lc.attribute(x, target=target, n_steps=n_steps, method=theirs).flatten(2).sum(-1).detach()
        rel = float((a - b).abs().max() / b.abs().max())
        t = timed({
            "ours": lambda: layer_conductance(model, x, n_steps=n_steps, method=ours, target=target),
            "captum": lambda: lc.attribute(x, target=target, n_steps=n_steps, method=theirs),
        }, repeats)
        rows.append((f"conductance {name} B={len(x)} n={n_steps}: ours {ours} vs Captum {theirs} (max rel diff {rel:.1e})",
                     f"{t['captum'] / t['ours']:.2f}× ({t['ours'] * 1e3:.0f} vs {t['captum'] * 1e3:.0f} ms)", "≥ 1.3×",
                     t["captum"] / t["ours"] >= 1.3 and rel <= 1e-4))

    def captum_embed(method):
        with torch.no_grad():
            h = model.features(x)
            pred = model.head(h).argmax(1)
        return lc.attribute(x, target=pred, n_steps=n_steps, method=method).flatten(2).sum(-1).detach()

    # the embed stage needs logits, features and conductance of the predicted class
    ours_lr = conductance_forward(model, x, n_steps=n_steps, method="left_riemann").conductance
    rel = float((ours_lr - captum_embed("riemann_trapezoid")).abs().max() / ours_lr.abs().max())
    t = timed({
        "ours": lambda: conductance_forward(model, x, n_steps=n_steps, method="left_riemann"),
        "paper": lambda: conductance_forward(model, x, n_steps=n_steps),
        "captum": lambda: captum_embed("riemann_trapezoid"),
    }, repeats)
    rows.append((f"embed view {name}: forward + Captum riemann_trapezoid vs ours conductance_forward left_riemann "
                 f"(logits+features+conductance; max rel diff {rel:.1e})",
                 f"{t['captum'] / t['ours']:.2f}× ({t['ours'] * 1e3:.0f} vs {t['captum'] * 1e3:.0f} ms)", "≥ 1.3×",
                 t["captum"] / t["ours"] >= 1.3 and rel <= 1e-4))
    rows.append((f"embed view {name}: ours conductance_forward right_riemann (paper rule) vs the Captum route above",
                 f"{t['captum'] / t['paper']:.2f}× ({t['paper'] * 1e3:.0f} ms)", "info", None))


def one_at_a_time(model, x, patches, preds):
    """Reference: every mutant, every image, one forward per image."""
    flips = np.zeros((len(x), len(patches)), bool)
    for m, p in enumerate(patches):
        with applied(p), torch.inference_mode():
            for i in range(len(x)):
                flips[i, m] = int(model(x[i : i + 1]).argmax(1)) != int(preds[i])
    return flips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    ap.add_argument("--operator", default="NAI")
    ap.add_argument("--rate", type=float, default=0.02)
    ap.add_argument("--mutants", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    rows: list[tuple] = []

    model, data = digits_data()
    xc, yc, ids = data[("digits-c", "test")]
    bench_conductance("digits-cnn/block3", model, xc[: 64 if args.quick else 128], 10, repeats, rows)
    from oodlib.models import load_model

    rn = load_model("resnet18", num_classes=10)
    bench_conductance("resnet18/layer4 64px", rn, torch.randn(4 if args.quick else 8, 3, 64, 64), 10, repeats, rows)

    # --- LCR ---
    xv, yv, _ = data[("digits", "val")]
    t0 = time.perf_counter()
    ms = generate_mutants(model, xv, yv, args.operator, args.rate, n_accepted=args.mutants)
    gen_s = time.perf_counter() - t0
    patches = ms.patches(model)
    xb = xc[:: 7 if args.quick else 3][: 256 if args.quick else 512]
    preds = predict(model, xb)

    def plain():
        with torch.inference_mode():
            for _ in range(len(patches)):
                model(xb).argmax(1)

    t = timed({"lcr": lambda: label_change_rate(model, xb, patches, preds=preds), "plain": plain}, max(2, repeats // 2))
    rows.append((f"LCR B={len(xb)}, {len(patches)} {args.operator} mutants vs {len(patches)} plain forwards",
                 f"{t['lcr'] / t['plain']:.2f}× ({t['lcr']:.2f} vs {t['plain']:.2f} s)", "≤ 1.2×", t["lcr"] / t["plain"] <= 1.2))
    sub, sub_m = xb[:32], patches[:10]
    full = label_change_rate(model, sub, sub_m, preds=preds[:32])
    ref = one_at_a_time(model, sub, sub_m, preds[:32])
    t1 = timed({"one": lambda: one_at_a_time(model, sub, sub_m, preds[:32])}, 1)["one"] / (32 * 10)
    per_pair = t["lcr"] / (len(xb) * len(patches))
    rows.append(("LCR batched vs one image at a time (per image×mutant; flips identical: "
                 f"{bool((full.flips == ref).all())})", f"{t1 / per_pair:.0f}× faster", "≥ 5× (far faster)",
                 t1 / per_pair >= 5 and bool((full.flips == ref).all())))

    # --- SPRT on digits-c: τ from correct predictions of the val part, evaluated on the test part ---
    src = np.array([i.rsplit("/", 1)[1] for i in ids])
    split = group_split(src, (0.0, 0.5, 0.5), seed=0)
    step = 6 if args.quick else 2
    sel_v, sel_t = np.flatnonzero(split == "val")[::step], np.flatnonzero(split == "test")[::step]
    pv, pt = predict(model, xc[sel_v]), predict(model, xc[sel_t])
    lcr_v = label_change_rate(model, xc[sel_v], patches, preds=pv).lcr
    tau = fit_sprt_tau(lcr_v[pv.numpy() == yc[sel_v]])
    full_t = label_change_rate(model, xc[sel_t], patches, preds=pt)
    sprt_t = label_change_rate(model, xc[sel_t], patches, preds=pt, sprt=SPRT(min(tau, 0.9)))
    wrong_t = pt.numpy() != yc[sel_t]
    a_full, a_sprt = error_auroc(wrong_t, full_t.lcr), error_auroc(wrong_t, sprt_t.lcr)
    used = float(sprt_t.used.mean())
    rows.append((f"SPRT digits-c test part (N={len(sel_t)}, τ={tau:.3f}): mean mutants used",
                 f"{used:.1f} of {len(patches)} ({100 * used / len(patches):.0f}%)", "≤ 35%", used <= 0.35 * len(patches)))
    rows.append((f"SPRT AUROC {a_sprt:.3f} vs full LCR {a_full:.3f}", f"Δ = {abs(a_sprt - a_full):.3f}", "≤ 0.01",
                 abs(a_sprt - a_full) <= 0.01))

    print(f"\nmutants: {args.operator} rate {args.rate}: {ms.n_accepted} accepted, {ms.n_rejected} rejected "
          f"(original val acc {ms.original_val_acc:.4f}; generation {gen_s:.1f} s)")
    print(f"LCR correct {full_t.lcr[~wrong_t].mean():.3f}±{full_t.lcr[~wrong_t].std():.3f}, "
          f"wrong {full_t.lcr[wrong_t].mean():.3f}±{full_t.lcr[wrong_t].std():.3f}\n")
    print("| measurement | result | target | status |\n|---|---|---|---|")
    for what, result, target, ok in rows:
        print(f"| {what} | {result} | {target} | {'-' if ok is None else 'PASS' if ok else 'FAIL'} |")


if __name__ == "__main__":
    main()
