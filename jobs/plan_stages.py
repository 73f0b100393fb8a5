"""The time estimates of the stages around EMBED/FIT/SCORE (:mod:`jobs.plan`): MANIFEST, MUTANTS,
GAUSSIANIZE, EVALUATE, ERRORS, VERDICTS, GRAPH and EXPLAIN, each from its configured work — the
rows it touches times what a row costs — at the rates :mod:`jobs.calibrate_stages` measured on
this machine (forwards, attribution maps, training steps, model fits), plus fixed costs measured
on a 2-core machine (:data:`FIXED_S`: figures, Ray task start, a process pool, a table write).

What each stage charges (its ``work`` column says it with the job's numbers):

* MUTANTS — ``tries`` mutants × ID val rows forwards (acceptance assumed :data:`ACCEPTANCE`, at most
  ``max_tries``) + the accepted mutants × validation-part rows (LCR for τ);
* GAUSSIANIZE — a BN pass over the long-tailed train rows (and torch-geometric's import);
* EVALUATE — one ROC/histogram figure per detector;
* ERRORS — conductance-detector steps (``detector_epochs`` × batches of 128, the fit and its 5
  out-of-fold refits), the fusions per fit row, ``n_bootstrap`` × methods × failure sources metric
  calls, one risk–coverage figure per source;
* VERDICTS — per incoming batch, (``drift_permutations`` + 1) × 5 folds logistic-regression fits,
  over a process pool of ≤ 2 workers; bootstrap thresholds per detector;
* GRAPH — per ablation ``epochs`` × nodes at its classifier's per-node rate, the kNN graphs;
* EXPLAIN — selected images × methods, the localization benchmark (its images × methods and the
  AE ablations, MoRF's 20 and LeRF's 11 forwards per image and method), one grid panel per
  image and method, the Ray task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from jobs.config import JobConfig

#: share of tried mutants that pass the accuracy bar (unknown before the run: 100 of 238 for the
#: digits CNN at NAI 0.02)
ACCEPTANCE = 0.5
#: fixed seconds, measured on a 2-core machine: a stage's own reads/writes/bookkeeping; an EVALUATE
#: figure, an EXPLAIN grid panel, an ERRORS risk–coverage figure; matplotlib's first import; a Ray
#: task with the model shipped; the C2ST tasks' start; torch-geometric's import; a fusion fit per row
FIXED_S = {"stage": 0.3, "manifest_row": 6e-5, "evaluate_fig": 0.25, "panel": 0.016, "rc_fig": 0.4, "matplotlib": 0.6,
           "ray_task": 2.0, "pool": 1.5, "pyg": 1.5, "fusion_row": 3.5e-4, "threshold_elem": 2e-8, "risk_threshold": 3e-5,
           "loc_image": 2e-3}
#: rates when not calibrated (the start of a run): per-row forward multiples, per-step/fit seconds
DEFAULT_RATES = {"mlp_step": 2.5e-3, "metric_a": 1.5e-4, "metric_b": 2e-7, "logreg_fit": 0.012,
                 "graph:linear": 2e-7, "graph:mlp": 2e-6, "graph:gcn": 2.5e-6}
#: seconds of an EXPLAIN method per image in forwards (uncalibrated: a heavy model)
ATTR_FORWARDS = {"rap": 6.0, "ae": 6.0, "lrp-eps": 4.0, "lrp-a1b0": 4.0, "lrp-a2b1": 4.0, "gradient": 3.0,
                 "input-x-gradient": 3.0, "integrated-gradients": 100.0, "gradcam": 3.0}
#: GRAPH's ablations → the node classifier's kind (:data:`oodlib.longtail.detector.ABLATIONS`; not
#: imported: torch-geometric's import would cost the plan 1.5 s — a test checks they agree)
ABLATION_KINDS = {"pretrain": "linear", "pretrain_gau": "linear", "pretrain_gcn": "gcn", "gcn": "gcn", "pretrain_gau_mlp": "mlp"}
#: failure-detection methods: the logit baselines and the 7 risks (conductance, LCR, LCR-SPRT, 4 fusions)
FAILURE_METHODS = 8 + 7
MOR_F, LER_F, AE_ABLATIONS = 20, 11, 5


@dataclass
class StageCost:
    name: str
    rows: float
    work: str  # what a row costs: "1 F", "reads 2.1 GiB" …
    written: float = 0.0  # bytes
    driver: float = 0.0  # bytes the driver holds for the stage (beyond the run's base)
    worker: float = 0.0  # host bytes per actor/task
    device: float = 0.0  # accelerator bytes per actor (EMBED)
    seconds: float = 0.0  # wall clock
    device_seconds: float = 0.0  # actor-seconds holding a GPU (EMBED)
    notes: list[str] = field(default_factory=list)
    parts: list["StageCost"] = field(default_factory=list)  # EMBED's extras


def _k(x: float) -> str:
    return f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.3g}k" if x >= 1e4 else f"{x:,.0f}"


class Sizes:
    """The job's row counts as the stages see them."""

    def __init__(self, cfg: JobConfig, counts: dict[tuple[str, str], int], batches: dict[str, list[int]] | None = None):
        self.cfg, self.counts = cfg, counts
        d, e = cfg.data, cfg.errors
        self.batches = [n for ds in d.incoming_datasets for n in (batches or {}).get(ds, [self.of(ds)]) if n]
        extra = sum(self.of(x) for x in e.extra_datasets if x != d.id_dataset)
        self.err_fit = self.of(d.id_dataset, "train") * e.fit_fraction + 0.5 * extra
        self.err_val = self.of(d.id_dataset, "val") + 0.25 * extra
        self.err_test = self.of(d.id_dataset, "test") + 0.25 * extra
        id_test = self.of(d.id_dataset, "test")
        self.sources = ([id_test] + [0.25 * self.of(x) for x in e.extra_datasets if x != d.id_dataset]
                        + [id_test + self.of(o) for o in e.new_class_sets(d.ood_groups)])
        g = cfg.graph
        self.graph_nodes = self.of(g.train_dataset, "train") + self.of(g.oe_dataset) + self.of(d.id_dataset, "val")
        self.graph_sets = [id_test + self.of(o) for o in (g.ood_datasets or d.ood_datasets)]

    def of(self, dataset: str, split: str | None = None) -> float:
        return float(sum(n for (d, s), n in self.counts.items() if d == dataset and split in (None, s)))

    def c2st(self) -> tuple[float, float]:
        """(reference rows, mean incoming rows) of a C2ST, each side capped at ``drift_max_rows``."""
        cap = self.cfg.verdicts.drift_max_rows
        ref = min(cap, self.of(self.cfg.data.id_dataset, "val"))
        return ref, (sum(min(cap, n) for n in self.batches) / len(self.batches)) if self.batches else 0.0

    def for_calibration(self, feature_dim: int, num_classes: int, conductance_width: int) -> dict:
        """The sizes :func:`jobs.calibrate_stages.calibrate_stages` times its kernels at."""
        ref, inc = self.c2st()
        return {"conductance_width": conductance_width, "c2st_rows": ref + inc, "c2st_dims": min(64, feature_dim),
                "source_rows": sum(self.sources) / max(1, len(self.sources)), "graph_nodes": self.graph_nodes,
                "feature_dim": feature_dim, "num_classes": num_classes}


def _rate(rates: dict, key: str) -> float:
    return rates.get(key, DEFAULT_RATES.get(key, 0.0))


def before_embed(cfg: JobConfig, sz: Sizes, cal) -> list[StageCost]:
    """MANIFEST, MUTANTS, GAUSSIANIZE (the enabled ones)."""
    n = float(sum(sz.counts.values()))
    fwd = cal.rates.get("fwd_driver", cal.forward)
    out = [StageCost("manifest", n, "build/read, write rows", seconds=FIXED_S["stage"] + cal.manifest + n * FIXED_S["manifest_row"])]
    if cfg.errors.enabled:
        m, id_val = cfg.errors.mutants, sz.of(cfg.data.id_dataset, "val")
        tries = min(m.max_tries or 10 * m.n_accepted, math.ceil(m.n_accepted / ACCEPTANCE))
        forwards = tries * id_val + (m.n_accepted + 2) * sz.err_val
        out.append(StageCost("mutants", sz.err_val, f"{tries} tries × {id_val:,.0f} + {m.n_accepted} × {sz.err_val:,.0f}: {_k(forwards)} F",
                             seconds=FIXED_S["stage"] + sz.err_val * cal.decode + forwards * fwd))
    if cfg.graph.enabled:
        g = cfg.graph
        rows = sz.of(g.train_dataset, "train")
        passes = 1 + 3 * g.bn_finetune_epochs
        out.append(StageCost("gaussianize", rows, f"decode + {passes} F (BN statistics)",
                             seconds=FIXED_S["stage"] + FIXED_S["pyg"] + rows * (cal.decode + passes * fwd)))
    return out


def after_score(cfg: JobConfig, sz: Sizes, cal, detectors: int, evaluated: float) -> list[StageCost]:
    """EVALUATE, ERRORS, VERDICTS, GRAPH, EXPLAIN (the enabled ones), in the pipeline's order."""
    r, out = cal.rates, []
    figs = detectors
    out.append(StageCost("evaluate", evaluated, f"metrics, {figs} figures",
                         seconds=FIXED_S["stage"] + FIXED_S["matplotlib"] + figs * FIXED_S["evaluate_fig"] + evaluated * detectors * 1e-6))
    if cfg.errors.enabled:
        out.append(_errors(cfg, sz, r))
    if cfg.verdicts.enabled:
        out.append(_verdicts(cfg, sz, r, detectors, cal.cpus))
    if cfg.graph.enabled:
        out.append(_graph(cfg, sz, r, cal.feature_dim, cal.num_classes, cal.flops))
    if cfg.explain.enabled:
        out.append(_explain(cfg, sz, r, cal.forward, len(sz.batches) if cfg.verdicts.enabled else 0))
    return out


def _errors(cfg: JobConfig, sz: Sizes, r: dict) -> StageCost:
    e = cfg.errors
    batches = lambda n: math.ceil(n / 128)  # noqa: E731
    steps = e.detector_epochs * (batches(sz.err_fit) + 5 * batches(0.8 * sz.err_fit))
    calls = sum((e.n_bootstrap + 1) * FAILURE_METHODS for _ in sz.sources)
    boot = sum((e.n_bootstrap + 1) * FAILURE_METHODS * (_rate(r, "metric_a") + _rate(r, "metric_b") * n) for n in sz.sources)
    figs = len(sz.sources) + (0 if e.sprt.early_stop else 1)
    rows = sz.err_fit + sz.err_val + sz.err_test
    seconds = (FIXED_S["stage"] + steps * _rate(r, "mlp_step") + sz.err_fit * FIXED_S["fusion_row"] + boot + figs * FIXED_S["rc_fig"])
    return StageCost("errors", rows, f"{_k(steps)} MLP steps, {_k(calls)} metric calls, {figs} figures", seconds=seconds)


def _verdicts(cfg: JobConfig, sz: Sizes, r: dict, detectors: int, cpus: int) -> StageCost:
    v, id_val = cfg.verdicts, sz.of(cfg.data.id_dataset, "val")
    ref, inc = sz.c2st()
    folds = max(2, min(5, int(ref), int(inc))) if sz.batches else 0
    fits = len(sz.batches) * (v.drift_permutations + 1) * folds
    jobs = max(1, min(len(sz.batches), cpus))  # one Ray task per batch
    risks = 7 if cfg.errors.enabled else 0
    thresholds = (detectors * v.n_boot * id_val * FIXED_S["threshold_elem"]
                  + risks * (v.n_boot + 1) * (FIXED_S["risk_threshold"] + sz.err_val * FIXED_S["threshold_elem"]))
    seconds = FIXED_S["stage"] + thresholds + (FIXED_S["pool"] + fits * _rate(r, "logreg_fit") / jobs if fits else 0.0)
    return StageCost("verdicts", float(sum(sz.counts.values())),
                     f"{len(sz.batches)} batches × {v.drift_permutations + 1} × {folds} C2ST fits", seconds=seconds)


def _graph(cfg: JobConfig, sz: Sizes, r: dict, d: int, c: int, flops: float) -> StageCost:
    g = cfg.graph
    n = sz.graph_nodes
    knn = lambda m: 2.0 * m * m * d / flops  # noqa: E731  (a flat cosine search over m rows)
    seconds = FIXED_S["stage"]
    for name in g.ablations:
        kind = ABLATION_KINDS.get(name, "gcn")
        seconds += g.epochs * n * _rate(r, f"graph:{kind}") + 0.1
        if kind == "gcn":
            seconds += knn(n) + sum(knn(m) for m in sz.graph_sets)
        seconds += sum(m * _rate(r, f"graph:{kind}") for m in sz.graph_sets) / 3  # inference: a forward, no backward
    return StageCost("graph", n + sum(sz.graph_sets), f"{len(g.ablations)} × {g.epochs} epochs × {n:,.0f} nodes", seconds=seconds)


def _explain(cfg: JobConfig, sz: Sizes, r: dict, forward: float, incoming_batches: int) -> StageCost:
    ex = cfg.explain
    per = {m: r.get(f"attr:{m}", ATTR_FORWARDS.get(m, 6.0) * forward) for m in [*ex.methods, "ae"]}
    chosen = sum(ex.counts.values()) + cfg.verdicts.top_k * incoming_batches
    figs = sum(1 for n in ex.counts.values() if n) + incoming_batches
    seconds = (FIXED_S["stage"] + FIXED_S["ray_task"] + chosen * sum(per[m] for m in ex.methods)
               + chosen * (len(ex.methods) + 1) * FIXED_S["panel"] + figs * 0.1)
    work = f"{chosen} images × {len(ex.methods)} methods"
    if ex.localization:
        n, ms = ex.localization_images, len(ex.methods)
        seconds += n * (FIXED_S["loc_image"] + sum(per[m] for m in ex.methods) + AE_ABLATIONS * per["ae"])
        seconds += n * forward * (MOR_F * (ms + AE_ABLATIONS) + LER_F * ms)
        work += f"; localization {n} × {ms + AE_ABLATIONS}"
    return StageCost("explain", chosen + (ex.localization_images if ex.localization else 0), work, seconds=seconds)
