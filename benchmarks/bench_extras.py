"""EMBED cost of the layer-statistics extras (RankFeat, Gram, NAC, AdaSCALE; layer means for info).

Same synthetic 224×224 JPEGs, same decode, ResNet-50 with random weights (no downloads), CPU.
Each configuration runs ``embed_batch`` with its extras; the cost it adds over ``embed_batch``
without extras is given in units of one forward pass (the inference-mode features + head of the
same batch). Target: the four extras together add ≤ 1.0 forward pass.

Exact floors, for reading the table: AdaSCALE needs a backward to the input and a second forward
(≈ 2 passes: the ``backward to input`` row); NAC a backward from the logits down to layer1; RankFeat
reruns layer4; Gram's row sums and the layer means are C·HW work per layer (≈ 0).
Run: ``.venv/bin/python benchmarks/bench_extras.py [--quick]``.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.embed_pass import embed_batch  # noqa: E402
from jobs.extras import ExtraSpec, build_extras  # noqa: E402
from oodlib.data.decode import decode_batch  # noqa: E402
from oodlib.data.manifest import conform  # noqa: E402
from oodlib.layers import DEFAULT_LAYERS  # noqa: E402
from oodlib.models import build_model  # noqa: E402

D = DEFAULT_LAYERS["resnet50"]
EXTRAS = {
    "rankfeat": ExtraSpec("rankfeat", {"layers": list(D["rankfeat"]), "temperature": 1.0}),
    "gram": ExtraSpec("gram", {"layers": list(D["gram"]), "powers": [1, 2, 3, 4, 5]}),
    "nac": ExtraSpec("nac", {"layers": list(D["nac"])}),
    "adascale": ExtraSpec("adascale", {"k1": 5.0, "k2": 1.0, "o": 0.05}),
    "layer_means": ExtraSpec("layer_means", {"layers": list(D["layer_means"])}),
}
CONFIGS = [("rankfeat", ["rankfeat"]), ("gram", ["gram"]), ("nac", ["nac"]), ("adascale", ["adascale"]),
           ("layer_means (info)", ["layer_means"]), ("rankfeat + gram (+ layer_means)", ["rankfeat", "gram", "layer_means"]),
           ("all four: rankfeat + gram + nac + adascale", ["rankfeat", "gram", "nac", "adascale"])]
TARGET = 1.0


def manifest(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    table = conform(pa.table({"image_id": [f"b{i}" for i in range(n)], "dataset": ["bench"] * n, "split": ["test"] * n,
                              "label": [0] * n, "image": pa.array(images, pa.binary())}))
    return table.append_column("shard", pa.array(np.zeros(n, np.int32)))  # one shard


def best_times(fns: dict, rounds: int) -> dict[str, float]:
    """The fastest of ``rounds`` interleaved runs of each function (robust to a busy machine)."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, best of 5 rounds")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    batch_size = args.batch_size or (4 if args.quick else 16)
    repeats = args.repeats or (5 if args.quick else 7)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("resnet50", 1000)
    batch = manifest(batch_size)
    cpu = torch.device("cpu")
    x, _ = decode_batch(batch.column("image").to_pylist(), [None] * batch_size, model.preprocess)

    def forward():
        with torch.inference_mode():
            model.head(model.features(x))

    def backward_to_input():
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
        torch.autograd.grad(logits.max(1).values.sum(), xg)

    fns = {"forward": forward, "backward": backward_to_input, "plain": lambda: embed_batch(model, batch, cpu)}
    for label, names in CONFIGS:
        extras = build_extras(tuple(EXTRAS[n] for n in names), model, cpu)
        fns[label] = lambda extras=extras: embed_batch(model, batch, cpu, extras)
    for fn in fns.values():  # warm-up (MKLDNN primitives, LAPACK, the cached inference trunk)
        fn()
    best = best_times(fns, repeats)
    t_fwd, t_plain = best["forward"], best["plain"]
    t_bwd = best["backward"] - t_fwd
    rows = [(label, best[label], (best[label] - t_plain) / t_fwd) for label, _ in CONFIGS]

    print(f"\nEMBED extras, resnet50 (random weights), 224 px, batch {batch_size}, {args.threads} torch threads, "
          f"CPU, best of {repeats} interleaved rounds\n")
    print(f"one forward (features + head, inference mode): {t_fwd:.2f} s; embed_batch without extras: {t_plain:.2f} s; "
          f"a backward to the input (after a grad forward) adds {t_bwd / t_fwd:.2f} forward passes\n")
    print("| extras | embed_batch s | added (forward passes) | target | result |")
    print("|---|---:|---:|---|---|")
    for label, t, added in rows:
        target = f"≤ {TARGET:.1f}" if label.startswith("all four") else "(info)"
        result = ("PASS" if added <= TARGET else "FAIL") if label.startswith("all four") else ""
        print(f"| {label} | {t:.2f} | {added:.2f} | {target} | {result} |")


if __name__ == "__main__":
    main()
