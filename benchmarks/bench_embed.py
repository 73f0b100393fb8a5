"""EMBED throughput: the Ray Data actor-pool path vs a bare single-process loop.

Same images (synthetic 224×224 JPEGs in a manifest), same decode, same model (resnet18, random
weights), same batch size and the same number of torch threads. Target: Ray path ≥ 0.8× the bare
loop. Run: ``.venv/bin/python benchmarks/bench_embed.py [--quick]``.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "token")

from jobs import embed_pass as embed, storage  # noqa: E402
from jobs.workers import ModelSpec, model_state_arrays  # noqa: E402
from oodlib.data.manifest import conform  # noqa: E402
from oodlib.models import load_model  # noqa: E402


def synthetic_manifest(n: int, seed: int = 0) -> pa.Table:
    """``n`` smooth random 224×224 RGB images as JPEG bytes (ImageNet-like sizes, ~10–20 KB)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((224, 224), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    table = conform(pa.table({"image_id": [f"bench/{i:06d}" for i in range(n)], "dataset": ["bench"] * n,
                              "split": ["test"] * n, "label": [0] * n, "image": pa.array(images, pa.binary())}))
    return table.append_column("shard", pa.array(np.zeros(n, np.int32)))  # one shard


def bare_loop(model, manifest: pa.Table, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, manifest.num_rows, batch_size):
        embed.embed_batch(model, manifest.slice(i, batch_size), torch.device("cpu"))
    return time.perf_counter() - start


def ray_path(spec: ModelSpec, manifest: pa.Table, batch_size: int, threads: int) -> float:
    import ray
    from ray.data import ActorPoolStrategy

    start = time.perf_counter()
    ds = ray.data.from_arrow([manifest.slice(i, batch_size) for i in range(0, manifest.num_rows, batch_size)])
    out = ds.map_batches(
        embed.EmbedActor, fn_constructor_kwargs={"spec": spec, "num_threads": threads}, batch_size=batch_size,
        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=threads,
    ).materialize()
    assert out.count() == manifest.num_rows
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 images, one repeat")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    n = args.images or (400 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 2)
    threads = max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)

    import ray

    manifest = synthetic_manifest(n)
    model = load_model("resnet18").eval()
    ray.init(address="local", num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = ModelSpec("resnet18", 1000, ray.put(model_state_arrays(model)), "cpu")
    bare_loop(model, manifest.slice(0, args.batch_size), args.batch_size)  # warm-up
    bare, via_ray = [], []
    for _ in range(repeats):
        bare.append(bare_loop(model, manifest, args.batch_size))
        via_ray.append(ray_path(spec, manifest, args.batch_size, threads))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        embed.run_embed(manifest, {0: storage.StageDir(Path(tmp), "bench")}, spec, args.batch_size, 1, 0.0, threads, Path(tmp) / "scratch")
        stage = time.perf_counter() - start
    ray.shutdown()

    t_bare, t_ray = statistics.median(bare), statistics.median(via_ray)
    ratio = t_bare / t_ray
    print(f"\nEMBED throughput, resnet18, {n} synthetic 224×224 JPEGs, batch {args.batch_size}, {threads} torch threads, CPU\n")
    print("| path | seconds (median) | images/s | ratio vs bare | target | result |")
    print("|---|---:|---:|---:|---|---|")
    print(f"| bare single-process loop | {t_bare:.2f} | {n / t_bare:.1f} | 1.00 | | |")
    print(f"| Ray Data actor pool (map_batches) | {t_ray:.2f} | {n / t_ray:.1f} | {ratio:.2f} | ≥ 0.80 | {'PASS' if ratio >= 0.8 else 'FAIL'} |")
    print(f"| full EMBED stage (+ Parquet commit) | {stage:.2f} | {n / stage:.1f} | {t_bare / stage:.2f} | (info) | |")


if __name__ == "__main__":
    main()
