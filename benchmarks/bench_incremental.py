"""Incremental recomputation on the embedded default, timed as a user sees it (a fresh
``python -m jobs.nightly`` process per run):

1. first run into an empty output directory;
2. the same run again (nothing changed) — target: ≤ 10% of the first run's time;
3. the manifest with 1% new images — target: only the shards holding new images are recomputed
   (their count is compared with the shards the new image ids hash to), only the new images are
   embedded (the unchanged rows of those shards are copied), FIT is reused.

Run: ``.venv/bin/python benchmarks/bench_incremental.py [--quick]`` (``--quick`` disables the
graph/explain/errors stages).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.shards import shard_of  # noqa: E402
from oodlib.data.digits import ImageSet, build_digits, noise_images  # noqa: E402
from oodlib.data.manifest import manifest_from_image_sets  # noqa: E402


def run_job(config: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, "-m", "jobs.nightly", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"job failed:\n{proc.stderr[-3000:]}")
    cfg = yaml.safe_load(config.read_text())
    return seconds, json.loads((Path(cfg["output"]) / cfg["experiment"] / "last_run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    base = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = build_digits(0)
        pq.write_table(manifest_from_image_sets(sets), tmp / "manifest.parquet")
        cfg = {**base, "experiment": "incremental", "output": str(tmp / "out"),
               "data": {**base["data"], "source": "manifest", "manifest": str(tmp / "manifest.parquet")},
               "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
        if args.quick:
            for stage in ("graph", "explain", "errors"):
                cfg[stage] = {**cfg.get(stage, {}), "enabled": False}
        (tmp / "job.yaml").write_text(yaml.safe_dump(cfg))

        t_first, first = run_job(tmp / "job.yaml")
        t_again, again = run_job(tmp / "job.yaml")

        n_total = sum(len(s.image_ids) for s in sets)
        n_new = max(1, round(0.01 * n_total))
        new = ImageSet("noise", "test", noise_images(n_new, np.random.default_rng(123)), np.full(n_new, -1),
                       [f"noise/test/new-{i:05d}" for i in range(n_new)])
        pq.write_table(manifest_from_image_sets([*sets, new]), tmp / "manifest.parquet")
        t_added, added = run_job(tmp / "job.yaml")

    shards_total = cfg["embed"]["num_shards"]
    affected = len(set(shard_of(new.image_ids, shards_total).tolist()))
    c = added["counts"]["embed"]
    ratio = t_again / t_first
    print(f"\nIncremental recomputation, digits ({n_total} images, {shards_total} shards; fresh process per run)\n")
    print("| run | seconds | shards re-embedded | reused stages | target | result |")
    print("|---|---:|---:|---|---|---|")
    reused = lambda s: ", ".join(k for k, v in s["reused"].items() if v) or "none"  # noqa: E731
    print(f"| first run | {t_first:.1f} | {first['counts']['embed']['shards_recomputed']} of {shards_total} | {reused(first)} | | |")
    print(f"| unchanged re-run | {t_again:.1f} | {again['counts']['embed']['shards_recomputed']} of {shards_total} | {reused(again)} | "
          f"≤ 10% of first ({100 * ratio:.1f}%) | {'PASS' if ratio <= 0.10 and again['counts']['embed']['shards_recomputed'] == 0 else 'FAIL'} |")
    ok = c["shards_recomputed"] == affected and c["images_embedded"] == n_new and added["reused"]["fit"]
    print(f"| +{n_new} new images (1%) | {t_added:.1f} | {c['shards_recomputed']} of {shards_total} "
          f"({c['images_embedded']} images embedded) | {reused(added)} | "
          f"only the {affected} shards the new ids hash to, only the {n_new} new images embedded; FIT reused | {'PASS' if ok else 'FAIL'} |")


if __name__ == "__main__":
    main()
