"""Wrong-prediction detection benchmark (issue 4): conductance vs Captum, batched LCR, SPRT.

Run: ``.venv/bin/python benchmarks/bench_errors.py [--quick] [--operator NAI --rate 0.02]``.
Prints one Markdown table with the measured ratios, the targets and PASS/FAIL:

* conductance ≥ 1.3× faster than Captum ``LayerConductance`` at the same n, layer, batch and
  values (ours ``left_riemann`` = Captum ``riemann_trapezoid``, ours ``gausslegendre`` = Captum's
  default), on the digits model and resnet18 (random weights, 64 px); plus the embed-stage view:
  our paper-rule ``conductance_forward`` (conductance + logits + features in one call) against
  the ordinary forward + Captum;
* LCR with 100 accepted mutants ≤ 1.2× the time of 100 plain forwards of the same batch
  (mutant patches are built once per actor and not timed; their one-off cost is printed), and
  the speed-up over one-image-at-a-time mutant evaluation (measured on a subset, per
  image×mutant). Each mutant runs from its first mutated stage (prefix reuse), so the LCR can
  cost less than 100 full forwards; the table shows where the accepted mutants start, and the
  same ratio with prefix reuse off (the cost of patching, reverting and bookkeeping alone);
* SPRT on digits-c: mean mutants per input ≤ 35% of 100 at an AUROC within 0.01 of full LCR
  (τ fitted as the job fits it: the 99% quantile of LCR over the correct predictions of the
  validation part — ID val and the val part of digits-c —, evaluated on the test part).
Timings: interleaved repeats, median (the machine is shared).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from collections import Counter
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oodlib.errors.conductance import conductance_forward, layer_conductance
from oodlib.errors.evaluation import group_split
from oodlib.errors.lcr import SPRT, first_mutated_stage, fit_sprt_tau, forward_stages, label_change_rate
from oodlib.errors.mutants import applied, generate_mutants, predict
from oodlib.metrics import error_auroc


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


def captum_right_riemann(model, x, target, n_steps):
    """The paper's right-end rule with Captum's own machinery (the helper ``LayerConductance``
    uses: one forward + backward over the n+1 path points, gradient at the right end)."""
    from captum._utils.gradient import compute_layer_gradients_and_eval

    b = len(x)
    pts = torch.cat([k / n_steps * x for k in range(n_steps + 1)]).requires_grad_()
    grads, evals = compute_layer_gradients_and_eval(model, model.layer(), (pts,), target_ind=target.repeat(n_steps + 1))
    cond = (grads[0][b:] * (evals[0][b:] - evals[0][:-b])).view(n_steps, b, *evals[0].shape[1:]).sum(0)
    return cond.flatten(2).sum(-1).detach()


def bench_conductance(name, model, x, n_steps, repeats, rows):
    """Ours vs Captum at the same model, layer, n, batch and target; values checked to 1e-4 rel."""
    from captum.attr import LayerConductance

    target = model(x).argmax(1)
    lc = LayerConductance(model, model.layer())
    theirs = {
        "left_riemann": ("LayerConductance riemann_trapezoid",
                         lambda: lc.attribute(x, target=target, n_steps=n_steps, method="riemann_trapezoid")),
        "gausslegendre": ("LayerConductance gausslegendre",
                          lambda: lc.attribute(x, target=target, n_steps=n_steps, method="gausslegendre")),
        "right_riemann": ("compute_layer_gradients_and_eval, right end",
                          lambda: captum_right_riemann(model, x, target, n_steps)),
    }
    for ours, (label, captum_fn) in theirs.items():
        a = layer_conductance(model, x, n_steps=n_steps, method=ours, target=target)
        b = captum_fn()
        b = b.flatten(2).sum(-1).detach() if b.dim() > 2 else b
        rel = float((a - b).abs().max() / b.abs().max())
        t = timed({
            "ours": lambda ours=ours: layer_conductance(model, x, n_steps=n_steps, method=ours, target=target),
            "captum": captum_fn,
        }, repeats)
        rows.append((f"conductance {name} B={len(x)} n={n_steps}: ours {ours} vs Captum {label} (max rel diff {rel:.1e})",
                     f"{t['captum'] / t['ours']:.2f}× ({t['ours'] * 1e3:.0f} vs {t['captum'] * 1e3:.0f} ms)", "≥ 1.3×",
                     t["captum"] / t["ours"] >= 1.3 and rel <= 1e-4))

    # transparency: how much of the gap a user closes by converting the model to channels-last
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    lc_cl = LayerConductance(cl, cl.layer())
    t = timed({
        "ours": lambda: layer_conductance(model, x, n_steps=n_steps, method="left_riemann", target=target),
        "captum_cl": lambda: lc_cl.attribute(x.contiguous(memory_format=torch.channels_last), target=target,
                                             n_steps=n_steps, method="riemann_trapezoid"),
    }, repeats)
    rows.append((f"conductance {name}: ours left_riemann vs Captum riemann_trapezoid on a channels-last copy of the model",
                 f"{t['captum_cl'] / t['ours']:.2f}×", "info", None))

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
    rows.append(((f"embed view {name}: forward + Captum riemann_trapezoid vs ours conductance_forward left_riemann "
                  f"(logits+features+conductance; max rel diff {rel:.1e})"),
                 f"{t['captum'] / t['ours']:.2f}× ({t['ours'] * 1e3:.0f} vs {t['captum'] * 1e3:.0f} ms)", "≥ 1.3×",
                 t["captum"] / t["ours"] >= 1.3 and rel <= 1e-4))
    rows.append((f"embed view {name}: ours conductance_forward right_riemann (paper rule) vs the Captum route above",
                 f"{t['captum'] / t['paper']:.2f}× ({t['paper'] * 1e3:.0f} ms)", "info", None))


class FullForward(torch.nn.Module):
    """``model`` behind one opaque forward: :func:`forward_stages` sees a single stage, so
    :func:`label_change_rate` runs every mutant over the whole model (prefix reuse off)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def one_at_a_time(model, x, patches, preds):
    """Reference: per-input mutant testing (Wang et al.'s detector loop) — for each image, every
    mutant is applied, run on that image alone, and reverted. Mutant patches are precomputed
    once, so the reference is not charged for regenerating them."""
    flips = np.zeros((len(x), len(patches)), bool)
    with torch.inference_mode():
        for i in range(len(x)):
            for m, p in enumerate(patches):
                with applied(p):
                    flips[i, m] = int(model(x[i : i + 1]).argmax(1)) != int(preds[i])
    return flips


def digits_c_parts(ids) -> np.ndarray:
    """fit/val/test per digits-c row by source image, exactly as the job's ``assign_parts``."""
    return group_split(np.array(["digits-c:" + i.rsplit("/", 1)[1] for i in ids]), seed=0)


def sprt_tau(model, data, patches) -> tuple[float, int]:
    """τ as the job fits it: the 99% quantile of LCR over the correct predictions of the
    validation part (ID val + the val part of digits-c). Returns (τ, number of those predictions)."""
    xv, yv, _ = data[("digits", "val")]
    xc, yc, ids = data[("digits-c", "test")]
    sel = digits_c_parts(ids) == "val"
    x, y = torch.cat([xv, xc[sel]]), np.concatenate([yv, yc[sel]])
    p = predict(model, x)
    correct = p.numpy() == y
    return fit_sprt_tau(label_change_rate(model, x, patches, preds=p).lcr[correct], len(patches)), int(correct.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    ap.add_argument("--operator", default="NAI")
    ap.add_argument("--rate", type=float, default=0.02)
    ap.add_argument("--mutants", type=int, default=100)
    ap.add_argument("--part", choices=("all", "conductance", "lcr"), default="all", help="run only one part")
    args = ap.parse_args()
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    rows: list[tuple] = []

    model, data = digits_data()
    xc = data[("digits-c", "test")][0]
    if args.part in ("all", "conductance"):
        bench_conductance("digits-cnn/block3", model, xc[: 64 if args.quick else 128], 10, repeats, rows)
        from oodlib.models import load_model

        rn = load_model("resnet18", num_classes=10)
        bench_conductance("resnet18/layer4 64px", rn, torch.randn(4 if args.quick else 8, 3, 64, 64), 10, repeats, rows)
    if args.part in ("all", "lcr"):
        bench_lcr(args, model, data, repeats, rows)
    print("| measurement | result | target | status |\n|---|---|---|---|")
    for what, result, target, ok in rows:
        print(f"| {what} | {result} | {target} | {'-' if ok is None else 'PASS' if ok else 'FAIL'} |")


def bench_lcr(args, model, data, repeats, rows) -> None:
    """LCR timing (batched vs plain forwards vs one image at a time) and the SPRT on digits-c."""
    xc, yc, ids = data[("digits-c", "test")]
    xv, yv, _ = data[("digits", "val")]
    t0 = time.perf_counter()
    ms = generate_mutants(model, xv, yv, args.operator, args.rate, n_accepted=args.mutants)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    patches = ms.patches(model)
    patch_s = time.perf_counter() - t0
    xb = xc[:: 7 if args.quick else 3][: 256 if args.quick else 512]
    preds = predict(model, xb)

    def plain():
        with torch.inference_mode():
            for _ in range(len(patches)):
                model(xb).argmax(1)

    whole = FullForward(model)  # one opaque stage: every mutant runs the whole forward (no prefix reuse)
    t = timed({"lcr": lambda: label_change_rate(model, xb, patches, preds=preds),
               "lcr_full": lambda: label_change_rate(whole, xb, patches, preds=preds),
               "plain": plain}, max(2, repeats // 2))
    rows.append((f"LCR B={len(xb)}, {len(patches)} {args.operator} mutants vs {len(patches)} plain forwards",
                 f"{t['lcr'] / t['plain']:.2f}× ({t['lcr']:.2f} vs {t['plain']:.2f} s)", "≤ 1.2×", t["lcr"] / t["plain"] <= 1.2))
    rows.append(("same, prefix reuse off (every mutant a full forward): patching, reverting and bookkeeping alone",
                 f"{t['lcr_full'] / t['plain']:.2f}× ({t['lcr_full']:.2f} s)", "≤ 1.2×", t["lcr_full"] / t["plain"] <= 1.2))
    stages = forward_stages(model)
    starts = Counter(first_mutated_stage(stages, p) for p in patches)
    rows.append(("LCR prefix reuse: mutants per first mutated stage (stage index: module)",
                 ", ".join(f"{i}: {type(stages[i]).__name__} ×{n}" for i, n in sorted(starts.items())), "info", None))
    sub, sub_m = xb[:32], patches[:10]
    full = label_change_rate(model, sub, sub_m, preds=preds[:32])
    ref = one_at_a_time(model, sub, sub_m, preds[:32])
    t1 = timed({"one": lambda: one_at_a_time(model, sub, sub_m, preds[:32])}, 1)["one"] / (32 * 10)
    per_pair = t["lcr"] / (len(xb) * len(patches))
    same = bool((full.flips == ref).all()) and bool((label_change_rate(whole, sub, sub_m, preds=preds[:32]).flips == ref).all())
    rows.append((f"LCR batched vs one image at a time (per image×mutant; flips identical, with and without prefix reuse: {same})",
                 f"{t1 / per_pair:.0f}× faster", "≥ 5× (far faster)", t1 / per_pair >= 5 and same))
    per_pair_full = t["lcr_full"] / (len(xb) * len(patches))
    rows.append(("same, prefix reuse off", f"{t1 / per_pair_full:.0f}× faster", "info", None))

    # --- SPRT on digits-c, τ fitted as the job fits it: the 99% quantile of LCR over the correct
    # predictions of the validation part (ID val + the val part of digits-c, split by source
    # image); evaluated on the test part of digits-c ---
    tau, n_correct = sprt_tau(model, data, patches)
    sel_t = np.flatnonzero(digits_c_parts(ids) == "test")[:: 3 if args.quick else 1]
    pt = predict(model, xc[sel_t])
    full_t = label_change_rate(model, xc[sel_t], patches, preds=pt)
    sprt_t = label_change_rate(model, xc[sel_t], patches, preds=pt, sprt=SPRT(tau))
    wrong_t = pt.numpy() != yc[sel_t]
    a_full, a_sprt = error_auroc(wrong_t, full_t.lcr), error_auroc(wrong_t, sprt_t.lcr)
    used = float(sprt_t.used.mean())
    rows.append((f"SPRT digits-c test part (N={len(sel_t)}, {int(wrong_t.sum())} wrong; τ={tau:.3f} from "
                 f"{n_correct} correct validation predictions): mean mutants used",
                 f"{used:.1f} of {len(patches)} ({100 * used / len(patches):.0f}%)", "≤ 35%", used <= 0.35 * len(patches)))
    rows.append((f"SPRT AUROC {a_sprt:.3f} vs full LCR {a_full:.3f} (signed: SPRT − full)", f"Δ = {a_sprt - a_full:+.3f}",
                 "≥ −0.01 (no worse than 0.01 below)", a_sprt - a_full >= -0.01))

    print(f"\nmutants: {args.operator} rate {args.rate}: {ms.n_accepted} accepted, {ms.n_rejected} rejected "
          f"(original val acc {ms.original_val_acc:.4f}; generation {gen_s:.1f} s; "
          f"building the patches of the accepted mutants once: {patch_s * 1e3:.0f} ms)")
    print(f"LCR correct {full_t.lcr[~wrong_t].mean():.3f}±{full_t.lcr[~wrong_t].std():.3f}, "
          f"wrong {full_t.lcr[wrong_t].mean():.3f}±{full_t.lcr[wrong_t].std():.3f}\n")


if __name__ == "__main__":
    main()
