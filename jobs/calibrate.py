"""The calibration behind ``oodlib plan`` (:mod:`jobs.plan`): a few batches of the configured model on
this machine's device (the config's ``model.device``; on the CPU with the threads of one EMBED actor,
``embed.cpus_per_actor``) — decode, the ordinary forward, and each EMBED extra that needs no upstream
result alone (LCR and ``gfeatures`` are estimated from their passes) — plus the extras' column
widths, the model's and its activations' bytes and a matrix-multiply rate for FIT/SCORE. Seconds."""
from __future__ import annotations

import copy
import io
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.config import JobConfig


@dataclass
class Calibration:
    device: str
    batch: int
    feature_dim: int
    num_classes: int
    decode: float  # seconds per row
    forward: float  # seconds per row (features + head)
    extras: dict[str, float] = field(default_factory=dict)  # seconds per row, measured (beyond the forward)
    widths: dict[str, int] = field(default_factory=dict)  # float32 values per row of each extra's columns
    model_bytes: float = 0.0
    activation_bytes: float = 0.0  # device bytes per row during EMBED (all of them kept when an extra needs a backward)
    image_bytes: float = 0.0  # embedded image bytes per manifest row (the digits' PNGs)
    flops: float = 1e10  # float32 matrix-multiply rate of one CPU thread (for FIT/SCORE), flop/s
    cpus: int = 1  # CPUs of the Ray cluster (or this machine) for FIT/SCORE tasks
    ray_running: bool = False
    seconds: float = 0.0
    #: the other stages' kernels (:mod:`jobs.calibrate_stages`; empty for a quick calibration), seconds
    rates: dict[str, float] = field(default_factory=dict)
    manifest: float = 0.0  # seconds to build the job's image sets (the embedded digits), measured by the row count

    def describe(self) -> str:
        measured = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in self.extras.items())
        return (f"{'calibrated' if self.forward else 'uncalibrated'} on {self.device} (batch {self.batch}, {self.seconds:.1f} s): "
                f"decode {self.decode * 1e3:.3g} + forward {self.forward * 1e3:.3g} ms/row"
                + (f"; extras {measured} ms/row" if measured else ""))


#: a warm-up call slower than this (seconds: a big model on a CPU) is timed once more only, and the
#: extras on :data:`HEAVY_ROWS` rows — the calibration stays seconds, not minutes
HEAVY_S, HEAVY_ROWS = 1.0, 4


def _timed(fn, reps: int) -> float:
    """The best of ``reps`` timed calls of ``fn`` after one warm-up call (lazy init, cudnn autotune);
    one timed call when the warm-up took over :data:`HEAVY_S`."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > HEAVY_S:
        reps = 1
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _sample_image(cfg: JobConfig, pre) -> tuple[bytes | None, str | None]:
    """An encoded image like the job's: a digits PNG, a JPEG of the preprocessing's source size, or
    a ``synthetic:`` path for a manifest of those."""
    from PIL import Image

    if cfg.data.source == "manifest" and cfg.data.manifest is not None and cfg.data.manifest.exists():
        import pyarrow.parquet as pq

        first = pq.ParquetFile(cfg.data.manifest).read_row_group(0, columns=["path", "image"]).slice(0, 1).to_pylist()
        if first and (first[0]["image"] is not None or (first[0]["path"] or "").startswith("synthetic:")
                      or os.path.exists(first[0]["path"] or "")):
            return first[0]["image"], first[0]["path"]
    side = pre.resize or max(pre.size)
    size = (pre.size[1], pre.size[0]) if cfg.data.source == "digits" else (round(side * 4 / 3), side)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(pre.mode)
    buf = io.BytesIO()
    img.save(buf, "PNG" if cfg.data.source == "digits" else "JPEG", quality=90)
    return buf.getvalue(), None


def _activation_bytes(model, x: torch.Tensor) -> tuple[float, float]:
    """(every module output of one forward, the largest one), bytes per row: what a backward keeps,
    and about what a forward without autograd needs at once."""
    total = [0, 0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()
            total[1] = max(total[1], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return float(total[0] + x[:1].numel() * 4), float(total[1])


def calibrate(cfg: JobConfig, model, quick: bool = False) -> Calibration:
    """Time the job's ``model`` (:func:`jobs.pipeline.load_job_model`) and extras on a few batches
    (``quick``: decode and the forward only)."""
    from jobs.extras import EXTRAS, ExtraSpec, build_extras, wanted_extras
    from oodlib.data.decode import decode_batch
    from oodlib.device import resolve_device

    t_start = time.perf_counter()
    device = resolve_device(cfg.model.device)
    model = copy.deepcopy(model).to(device).eval()
    pre = model.preprocess
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.embed.cpus_per_actor)))
    try:
        b = min(cfg.embed.batch_size, 16 if device.type == "cpu" else 256)
        reps = 1 if quick else 2
        image, path = _sample_image(cfg, pre)
        decode = _timed(lambda: decode_batch([image] * b, [path] * b, pre), 1) / b
        x = torch.randn(b, pre.channels, *pre.size, device=device)

        def forward():
            with torch.inference_mode():
                model.head(model.features(x))

        fwd = _timed(forward, reps) / b
        if fwd * b > HEAVY_S:  # the extras (a backward each …) on a few rows, once
            x, reps = x[:HEAVY_ROWS], 1
        with torch.inference_mode():
            h = model.features(x)
            f = model.head(h)
        cal = Calibration(str(device), b, model.feature_dim, model.num_classes, decode, fwd,
                          model_bytes=float(sum(p.numel() * p.element_size() for p in model.state_dict().values())),
                          image_bytes=float(len(image)) if cfg.data.source == "digits" and image else 0.0)
        backward = False
        for name, params in wanted_extras(cfg).items():
            cls = EXTRAS[name]
            backward |= cls.passes(params, cfg)[1] > 0
            if cls.upstream:  # needs a result of a stage before EMBED: widths from the config, time from the passes
                cal.widths[name] = (model.feature_dim if name == "gfeatures"
                                    else 2 + (0 if params.get("early_stop") else cfg.errors.mutants.n_accepted))
                continue
            extra = build_extras((ExtraSpec(name, params),), model, device)[0]
            cal.widths[name] = sum(w if isinstance(w, int) else 1 for w in extra.columns.values())
            if not quick:
                # a fresh tensor per call: a shared pass caches its result by the batch tensor
                call = (lambda e=extra: e.forward(model, x.clone())) if hasattr(extra, "forward") else (lambda e=extra: e(model, x.clone(), h, f))
                t = _timed(call, reps) / len(x)
                cal.extras[name] = max(0.0, t - fwd) if hasattr(extra, "forward") else t
        every, largest = _activation_bytes(model, x)
        cal.activation_bytes = every if backward else 3 * largest
        torch.set_num_threads(1)  # the rate of one CPU (a FIT task, a SCORE actor)
        a, w = torch.randn(512, 2048), torch.randn(2048, 512)
        cal.flops = 2 * 512 * 2048 * 512 / max(1e-6, _timed(lambda: a @ w, 3))
        ray = sys.modules.get("ray")
        cal.ray_running = bool(ray is not None and ray.is_initialized())
        cal.cpus = int(ray.cluster_resources().get("CPU", 1)) if cal.ray_running else (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(threads)
    cal.seconds = time.perf_counter() - t_start
    return cal
