"""Scale: an ImageNet-shaped run — 1,281,167 train + 50,000 val/test + 40,000 OOD rows — through
MANIFEST, EMBED, FIT, SCORE and EVALUATE on a local Ray, at fractions of that size.

The backbone is ``standin-imagenet`` (D = 2048, C = 1000 at 16×16 px; :mod:`oodlib.models.standin`)
and the images are ``synthetic:<seed>`` manifest paths (:data:`oodlib.data.decode.SYNTHETIC`), so
what is measured is the pipeline — storage, the driver's and the workers' memory, FIT's and
SCORE's work at D = 2048, C = 1000 — not the network or JPEG decoding. Detectors: those of
``configs/imagenet.yaml`` that apply (GMM left out: 1000 covariances of 2048², 34 GB), with the
bank detectors that load the train split (ViM, SHE, OpenMax, pNML, Gram, multi-layer Mahalanobis,
NAC) fitted on a seeded fraction of it (``fit_fraction``, :data:`FRACTIONS`: the same rows at every
scale), KNN/NNGuide on their 1% bank.

Reported per scale: wall time per stage, peak RSS of the driver and of every Ray worker (RSS − shared,
as Ray's memory monitor counts it; psutil sampling in a thread every 0.25 s), bytes written per
stage; a table (``bench_scale.md``), ``bench_scale.json`` and a plot (``bench_scale.png``) under
``--out``. Targets (PASS/FAIL): driver peak RSS ≤ 4 GiB, every worker ≤ 6 GiB, cost ~linear (the
per-row cost of the largest step at most 1.5× that of the step below; needs three scales).

Run: ``.venv/bin/python benchmarks/bench_scale.py [--scales 0.01,0.1,1] [--quick] [--actors 2] [--resume]``
(``--quick``: 1/100 only; ``--resume``: keep the scales already measured in ``--out``). The full size writes ~25 GB and takes a while on a few cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "token")

GiB = 2**30
FULL = {("imagenet", "train"): 1_281_167, ("imagenet", "val"): 5_000, ("imagenet", "test"): 45_000,
        ("ssb-hard", "test"): 10_000, ("ninco", "test"): 10_000, ("inaturalist", "test"): 10_000, ("textures", "test"): 10_000}
TARGETS = {"driver_gib": 4.0, "worker_gib": 6.0, "superlinear": 1.5}
STAGES = ("manifest", "embed", "fit", "score", "evaluate")
LAYERS = {"gram": "block1,block2", "layer_means": "block1,block2,block3", "nac": "avgpool,block3,block2,block1", "rankfeat": "block3,block2"}
#: full-size fit fractions of the bank detectors that load the train split: they fit on the same number
#: of rows at every scale (``min(1, fraction / scale)``) — ~128k rows for ViM/SHE/OpenMax/pNML, 64k for
#: Gram (480 values a row), 25.6k for multi-layer Mahalanobis (2144) and NAC (which uses 1000)
FRACTIONS = {"vim": 0.1, "she": 0.1, "openmax": 0.1, "pnml": 0.1, "gram": 0.05, "multi_mahalanobis": 0.02, "nac": 0.02}


def detectors(scale: float) -> list:
    """The detectors of ``configs/imagenet.yaml`` that apply (no GMM), with the fractions at ``scale``."""
    frac = {k: min(1.0, f / scale) for k, f in FRACTIONS.items()}
    return [
        "msp", "energy", "odin", "mahalanobis", {"name": "react", "params": {"percentile": 90}}, {"name": "dice", "params": {"p": 70}},
        {"name": "knn", "params": {"k": 1000, "alpha": 0.01}},
        {"name": "line", "params": {"p_w": 10, "p_a": 10, "delta": 0.8}},
        {"name": "line", "params": {"p_w": None, "p_a": 10, "delta": 0.8}, "column": "line_no_wp"},
        "tempscale", "entropy", "gen", "klm", "ash_p", "ash_b", "ash_s", "scale", "lts", "nci", "fdbd", "nnguide",
        {"name": "vim", "params": {"dim": 1000}, "fit_fraction": frac["vim"]}, {"name": "residual", "params": {"dim": 512}}, "rmds",
        {"name": "she", "fit_fraction": frac["she"]}, {"name": "openmax", "fit_fraction": frac["openmax"]}, "vra", "gradnorm",
        "graduncertainty", {"name": "pnml", "fit_fraction": frac["pnml"]},
        {"name": "rankfeat", "params": {"layers": LAYERS["rankfeat"]}},
        {"name": "gram", "params": {"layers": LAYERS["gram"]}, "fit_fraction": frac["gram"]},
        {"name": "multi_mahalanobis", "params": {"layers": LAYERS["layer_means"]}, "fit_fraction": frac["multi_mahalanobis"]},
        {"name": "nac", "params": {"layers": LAYERS["nac"]}, "fit_fraction": frac["nac"]},
        {"name": "adascale_a", "params": {"percentile": [80, 85]}}, {"name": "adascale_l", "params": {"percentile": [80, 85]}},
    ]


def synthetic_manifest(path: Path, scale: float, seed: int = 0) -> int:
    """The manifest of ``scale`` × the ImageNet-shaped row counts; returns its rows."""
    rng = np.random.default_rng(seed)
    parts = []
    start = 0
    for (dataset, split), n in FULL.items():
        n = max(1, round(n * scale))
        ids = np.arange(start, start + n)
        labels = rng.integers(0, 1000, n) if dataset == "imagenet" else np.full(n, -1)
        parts.append(pa.table({
            "image_id": [f"{dataset}/{split}/{i:08d}" for i in ids], "dataset": [dataset] * n, "split": [split] * n,
            "label": pa.array(labels, pa.int32()), "subset": pa.nulls(n, pa.string()), "batch": pa.nulls(n, pa.string()),
            "path": [f"synthetic:{i}" for i in ids], "image": pa.nulls(n, pa.binary()),
        }))
        start += n
    table = pa.concat_tables(parts)
    pq.write_table(table, path)
    return table.num_rows


def job_config(out: Path, manifest: Path, actors: int, shards: int, rows: int, scale: float) -> dict:
    return {
        "experiment": "scale", "output": str(out),
        "data": {"source": "manifest", "manifest": str(manifest), "id_dataset": "imagenet",
                 "ood_datasets": ["ssb-hard", "ninco", "inaturalist", "textures"],
                 "ood_groups": {"near": ["ssb-hard", "ninco"], "far": ["inaturalist", "textures"]}},
        "model": {"name": "standin-imagenet", "device": "cpu"},
        # a wave's output waits in the object store until it is written: waves of at most ~50,000 rows
        "embed": {"batch_size": 256, "num_actors": actors, "num_gpus_per_actor": 0, "num_shards": shards,
                  "shards_per_wave": max(1, min(shards, int(shards * 50_000 / rows)))},
        "detectors": detectors(scale), "mlflow": {"enabled": False}, "runtime": {"stall_timeout_s": 3600},
    }


class Sampler:
    """Peak memory of the driver (RSS) and of every Ray worker process (RSS − shared) below it."""

    def __init__(self, every: float = 0.25) -> None:
        import psutil

        self.me = psutil.Process()
        self.every, self.stop = every, threading.Event()
        self.samples: list[tuple[float, float, float, str, float]] = []  # (t, driver RSS, largest worker, its title, driver RSS − shared)
        self.workers: dict[int, tuple[float, str]] = {}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                info = self.me.memory_info()
                driver, driver_private = float(info.rss), float(info.rss - info.shared)
            except psutil.Error:
                break
            top, title = 0.0, ""
            for p in self.me.children(recursive=True):
                try:
                    cmd = p.cmdline()
                    if not cmd or not cmd[0].startswith("ray::"):
                        continue  # raylet, GCS, agents: Ray's own services
                    info = p.memory_info()
                    private = float(info.rss - info.shared)
                except psutil.Error:
                    continue
                name = cmd[0].split(" ")[0]
                if private > self.workers.get(p.pid, (0.0, ""))[0]:
                    self.workers[p.pid] = (private, name)
                if private > top:
                    top, title = private, name
            self.samples.append((time.time(), driver, top, title, driver_private))
            self.stop.wait(self.every)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def peaks(self, t0: float, t1: float) -> tuple[float, float, float, str]:
        """(driver RSS, driver RSS − shared, largest worker, its title) at their peaks between t0 and t1
        (a stage shorter than the sampling period: the first sample after it started)."""
        window = [s for s in self.samples if t0 <= s[0] <= t1] or [s for s in self.samples if s[0] >= t0][:1]
        if not window:
            return 0.0, 0.0, 0.0, ""
        best = max(window, key=lambda s: s[2])
        return max(s[1] for s in window), max(s[4] for s in window), best[2], best[3]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def run_scale(scale: float, out: Path, actors: int, shards: int) -> dict:
    import ray

    from jobs import logs, pipeline
    from jobs.config import parse_config

    work = out / f"run-{scale:g}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = synthetic_manifest(work / "manifest.parquet", scale)
    cfg = parse_config(job_config(work / "out", work / "manifest.parquet", actors, shards, rows, scale))
    intervals: dict[str, tuple[float, float]] = {}

    class Timed(logs.Heartbeat):  # records when each stage ran, to attribute the memory samples
        def __exit__(self, *exc):
            intervals[self.stage] = (self.started, time.time())
            return super().__exit__(*exc)

    pipeline.Heartbeat = Timed
    print(f"\n## scale {scale:g}: {rows:,} rows\n", flush=True)
    try:
        with Sampler() as sampler:
            t0 = time.time()
            summary = pipeline.run(cfg)
            total = time.time() - t0
    finally:
        ray.shutdown()
    root = work / "out" / "scale"
    written = {"manifest": dir_bytes(root / "manifest"), "embed": dir_bytes(root / "tables" / "features") + dir_bytes(root / "embed"),
               "fit": dir_bytes(root / "fit"), "score": dir_bytes(root / "tables" / "scores") + dir_bytes(root / "score"),
               "evaluate": dir_bytes(root / "evaluate")}
    stages = {}
    for s in STAGES:
        driver, private, worker, title = sampler.peaks(*intervals.get(s, (t0, time.time())))
        stages[s] = {"seconds": summary["seconds"].get(s, 0.0), "driver_gib": driver / GiB, "driver_private_gib": private / GiB,
                     "worker_gib": worker / GiB, "worker": title, "written_gib": written[s] / GiB}
    result = {"scale": scale, "rows": rows, "total_seconds": total, "stages": stages,
              "driver_peak_gib": max(s[1] for s in sampler.samples) / GiB,
              "driver_private_peak_gib": max(s[4] for s in sampler.samples) / GiB,
              "worker_peak_gib": max((w for w, _ in sampler.workers.values()), default=0.0) / GiB,
              "worker_peak": max(sampler.workers.values(), default=(0, ""))[1], "workers_seen": len(sampler.workers)}
    shutil.rmtree(work / "out", ignore_errors=True)
    return result


def linearity(results: list[dict]) -> float | None:
    """Marginal seconds per row of the largest step over that of the step below (None with < 3 scales)."""
    if len(results) < 3:
        return None
    a, b, c = results[-3:]
    low = (b["total_seconds"] - a["total_seconds"]) / (b["rows"] - a["rows"])
    high = (c["total_seconds"] - b["total_seconds"]) / (c["rows"] - b["rows"])
    return high / low if low > 0 else None


def report(results: list[dict], out: Path) -> str:
    lines = ["| scale | rows | stage | seconds | driver peak RSS GiB (− shared) | worker peak GiB (which) | written GiB |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        for s, v in r["stages"].items():
            lines.append(f"| {r['scale']:g} | {r['rows']:,} | {s} | {v['seconds']:.1f} | {v['driver_gib']:.2f} ({v['driver_private_gib']:.2f}) | "
                         f"{v['worker_gib']:.2f} ({v['worker'] or '-'}) | {v['written_gib']:.3f} |")
        lines.append(f"| {r['scale']:g} | {r['rows']:,} | **total** | {r['total_seconds']:.1f} | {r['driver_peak_gib']:.2f} "
                     f"({r['driver_private_peak_gib']:.2f}) | {r['worker_peak_gib']:.2f} ({r['worker_peak']}) | "
                     f"{sum(v['written_gib'] for v in r['stages'].values()):.3f} |")
    driver = max(r["driver_peak_gib"] for r in results)
    worker = max(r["worker_peak_gib"] for r in results)
    lin = linearity(results)
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines += ["", f"- driver peak RSS {driver:.2f} GiB ≤ {TARGETS['driver_gib']:g} GiB: **{verdict(driver <= TARGETS['driver_gib'])}**",
              f"- every worker ≤ {TARGETS['worker_gib']:g} GiB (RSS − shared; peak {worker:.2f} GiB): **{verdict(worker <= TARGETS['worker_gib'])}**",
              "- cost ~linear (largest step's seconds per row ≤ 1.5× the step below): "
              + (f"{lin:.2f}× **{verdict(lin <= TARGETS['superlinear'])}**" if lin is not None else "n/a (needs three scales)")]
    if results[-1]["scale"] < 1:
        lines.append(f"- measured up to {results[-1]['scale']:g} of the full size; the targets are for the full size")
    text = "\n".join(lines)
    (out / "bench_scale.md").write_text(text + "\n")
    (out / "bench_scale.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench_scale.png")
    return text


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r["rows"] for r in results]
    fig, (ax_t, ax_m, ax_w) = plt.subplots(1, 3, figsize=(15, 4.5))
    for s in STAGES:
        ax_t.plot(rows, [r["stages"][s]["seconds"] for r in results], "o-", label=s)
    ax_t.plot(rows, [r["total_seconds"] for r in results], "k^--", label="total")
    if len(rows) > 1:
        ax_t.plot(rows, [results[0]["total_seconds"] * n / rows[0] for n in rows], ":", color="grey", label="linear from the smallest")
    ax_t.set(xscale="log", yscale="log", xlabel="rows", ylabel="seconds", title="wall time per stage")
    ax_t.set_ylim(bottom=ax_t.get_ylim()[0] / 30)  # room for the legend below the lines
    ax_t.legend(fontsize=8, ncol=3, loc="lower right")
    ax_m.plot(rows, [r["driver_peak_gib"] for r in results], "o-", label="driver peak RSS")
    ax_m.plot(rows, [r["worker_peak_gib"] for r in results], "s-", label="largest worker (RSS − shared)")
    ax_m.axhline(TARGETS["driver_gib"], color="C0", ls=":", label="driver target")
    ax_m.axhline(TARGETS["worker_gib"], color="C1", ls=":", label="worker target")
    ax_m.set(xscale="log", xlabel="rows", ylabel="GiB", title="peak memory")
    ax_m.set_ylim(0, max(TARGETS["worker_gib"], *(r["driver_peak_gib"] for r in results), *(r["worker_peak_gib"] for r in results)) * 1.35)
    ax_m.legend(fontsize=8, ncol=2, loc="upper left")
    for s in STAGES:
        written = [r["stages"][s]["written_gib"] for r in results]
        if max(written) > 0:
            ax_w.plot(rows, written, "d-", label=s)
    ax_w.plot(rows, [sum(v["written_gib"] for v in r["stages"].values()) for r in results], "k^--", label="total")
    ax_w.set(xscale="log", yscale="log", xlabel="rows", ylabel="GiB", title="bytes written per stage")
    ax_w.legend(fontsize=8, ncol=2, loc="upper left")
    for ax in (ax_t, ax_m, ax_w):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("bench_scale: ImageNet-shaped run, standin-imagenet (D 2048, C 1000), local Ray")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="0.01,0.1,1", help="fractions of the full size, ascending")
    parser.add_argument("--quick", action="store_true", help="1/100 only")
    parser.add_argument("--actors", type=int, default=max(1, min(4, (os.cpu_count() or 2))), help="EMBED actors")
    parser.add_argument("--shards", type=int, default=64, help="embed.num_shards (the same at every scale)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scale"))
    parser.add_argument("--resume", action="store_true", help="keep the scales already in --out/bench_scale.json, run the rest")
    args = parser.parse_args()
    scales = [0.01] if args.quick else sorted(float(s) for s in args.scales.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    done = {r["scale"]: r for r in json.loads((args.out / "bench_scale.json").read_text())} if args.resume and (args.out / "bench_scale.json").is_file() else {}
    results = []
    for scale in scales:
        if scale in done:
            results.append(done[scale])
            continue
        results.append(run_scale(scale, args.out, args.actors, args.shards))
        print("\n" + report(results, args.out), flush=True)
    print(f"\nwrote {args.out / 'bench_scale.md'}, bench_scale.json, bench_scale.png")


if __name__ == "__main__":
    main()
