"""``oodlib plan``: what a run will cost, before it runs and without the data.

Per stage (and per EMBED extra): the rows it touches, the network passes per row, the bytes it
writes, the estimated driver memory and per-worker memory, and the estimated time — EMBED's from a
short calibration of the configured model on this machine's device (:mod:`jobs.calibrate`: a few
batches, seconds), summed in GPU-hours (actor-hours) and divided over ``embed.num_actors``. Row
counts come from a manifest (``--manifest``, or the config's), the embedded digits benchmark, or
the ``rows:`` of each image set in ``data.sets`` (planning an ImageNet run on a laptop). The start of
every run prints the short form (:func:`print_run_plan`). A plan whose driver memory exceeds
``runtime.max_driver_memory_gb`` is refused: :class:`PlanRefused`, exit code 2.

Estimates, not measurements: memory counts the big arrays a stage holds (Arrow + NumPy copies),
times add fixed costs measured on a local Ray (:data:`FIXED`); FIT's and SCORE's are flop counts at
the calibrated rate of one CPU and leave out the detectors' own overheads (OpenMax's per-class fits
at C = 1000 …), so they are low for many-class heads. The other stages (MANIFEST, MUTANTS,
GAUSSIANIZE, EVALUATE, ERRORS, VERDICTS, GRAPH, EXPLAIN) are charged their configured work at rates
timed on this machine (:mod:`jobs.plan_stages`, :mod:`jobs.calibrate_stages`); the stages are listed
in the pipeline's order. ``benchmarks/bench_scale.py`` measures.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.calibrate import Calibration, calibrate
from jobs.config import ConfigError, JobConfig
from jobs.plan_stages import Sizes, StageCost, after_score, before_embed
from jobs.rows import errors_rows, every_row, graph_rows, scored_rows

GiB = 2**30
#: fixed costs (seconds) on a local Ray, measured on a 2-core machine: Ray's start, one EMBED wave
#: (a Ray Data pipeline whose actors start and load the model), a Ray task or actor worker start
FIXED = {"ray_start": 3.0, "wave": 4.5, "batch": 0.004, "shard_commit": 0.05, "fit": 2.5, "score": 3.0}
READ_BPS, WRITE_BPS = 300e6, 150e6  # Parquet bytes/s per task (read, write)
DRIVER_BASE = 0.6 * GiB  # the driver process: Python, torch, Ray, the model
ACTOR_BASE = 0.5 * GiB
MANIFEST_ROW_B = 400  # a manifest row in the driver (strings, the row identity), without image bytes
META_ROW_B = 80  # ids, dataset, split … of a features/scores row on disk


class PlanRefused(ConfigError):
    """The plan's estimated driver memory exceeds ``runtime.max_driver_memory_gb``."""


@dataclass
class Plan:
    experiment: str
    counts: dict[tuple[str, str], int]
    source: str
    calibration: Calibration
    stages: list[StageCost]
    persistent: float  # bytes the driver holds for the whole run (base + manifest)
    limit: float | None
    actors: int = 1
    batch_size: int = 1
    batches: dict[str, list[int]] = field(default_factory=dict)  # rows per batch of each incoming dataset

    def stage(self, name: str) -> StageCost | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def driver_peak(self) -> tuple[float, str]:
        top = max(self.stages, key=lambda s: s.driver)
        return self.persistent + top.driver, top.name

    @property
    def gpu_hours(self) -> float:
        return sum(s.device_seconds for s in self.stages) / 3600

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


def row_counts(cfg: JobConfig, manifest: str | Path | None = None
               ) -> tuple[dict[tuple[str, str], int] | None, str, dict[str, list[int]]]:
    """Rows per (dataset, split) of the job (its datasets, ``limit_per_split`` per batch, as MANIFEST
    keeps them), where they come from, and the rows per batch of each incoming dataset; (None, why,
    {}) when unknown (image sets on disk without ``rows:``)."""
    from jobs.stages.manifest import wanted_datasets

    keyed: dict[tuple[str, str, str], int] = {}  # (dataset, split, batch)
    manifest = manifest or (cfg.data.manifest if cfg.data.source == "manifest" else None)
    if manifest is not None:
        import pyarrow.parquet as pq

        cols = ["dataset", "split", *(["batch"] if "batch" in pq.read_schema(manifest).names else [])]
        t = pq.read_table(manifest, columns=cols).group_by(cols).aggregate([([], "count_all")])
        batch = t.column("batch").to_pylist() if "batch" in cols else [""] * t.num_rows
        for d, s, b, n in zip(t.column("dataset").to_pylist(), t.column("split").to_pylist(), batch, t.column("count_all").to_pylist()):
            keyed[d, s, b or ""] = n
        source = f"manifest {manifest}"
    elif cfg.data.source == "digits":
        from oodlib.data.digits import build_digits
        from oodlib.data.incoming import digits_incoming_batches

        sets = build_digits(cfg.data.seed)
        for s in [*sets, *digits_incoming_batches(cfg.data.seed, sets=sets)]:
            for b in (s.batches or [""] * len(s.image_ids)):
                keyed[s.dataset, s.split, b] = keyed.get((s.dataset, s.split, b), 0) + 1
        source = "the embedded digits benchmark"
    else:
        missing = [f"{s.dataset}/{s.split}" for s in cfg.data.sets if s.rows is None]
        if missing:
            return None, f"data.sets {missing} have no rows: (give them, or --manifest)", {}
        for s in cfg.data.sets:
            val = (s.val_per_class or 0) * (cfg.model.num_classes or 1000) if (s.val_per_class or s.imbalance_ratio) else 0
            keyed[s.dataset, s.split, ""] = keyed.get((s.dataset, s.split, ""), 0) + s.rows - val
            if val:
                keyed[s.dataset, "val", ""] = keyed.get((s.dataset, "val", ""), 0) + val
        source = "the rows: of data.sets"
    datasets = {n for names in wanted_datasets(cfg).values() for n in names}
    limit = cfg.data.limit_per_split or math.inf
    counts: dict[tuple[str, str], int] = {}
    batches: dict[str, list[int]] = {}
    for (d, s, b), n in sorted(keyed.items()):
        if d in datasets:
            counts[d, s] = counts.get((d, s), 0) + int(min(n, limit))
            if d in cfg.data.incoming_datasets and b:
                batches.setdefault(d, []).append(int(min(n, limit)))
    return counts, source, batches


def _passes(f: float, b: float) -> str:
    return f"{f:g} F" + (f" + {b:g} B" if b else "")


def _bank_rows(det, d, n: int) -> float:
    """Rows a detector's fit holds on the driver (a drawn bank, a loaded split), or 0."""
    if hasattr(det, "bank_sample"):
        fraction, _, minimum = det.bank_sample()
        return max(minimum, min(1.0, fraction) * n)
    if "bank" in det.fit_needs or det.fit_split != "train":
        return d.fit_fraction * n
    return 0.0


def estimate(cfg: JobConfig, counts: dict[tuple[str, str], int], cal: Calibration, source: str = "",
             batches: dict[str, list[int]] | None = None) -> Plan:
    """The cost plan of ``cfg`` over ``counts`` rows (``batches``: rows per batch of each incoming
    dataset) with the calibration ``cal``; the stages in the pipeline's order."""
    from jobs.extras import EXTRAS, wanted_extras
    from oodlib.detectors import make_detector

    e, D, C = cfg.embed, cal.feature_dim, cal.num_classes
    n = float(sum(counts.values()))
    id_ = cfg.data.id_dataset
    n_train, n_split = counts.get((id_, "train"), 0), {s: counts.get((id_, s), 0) for s in ("train", "val", "test")}
    extras = wanted_extras(cfg)
    widths = {name: cal.widths.get(name, 0) for name in extras}
    row_b = 4 * (D + C) + META_ROW_B + 4 * sum(widths.values())  # a row with every extra (a missing vector compresses away)
    sizes = Sizes(cfg, counts, batches)
    stages = before_embed(cfg, sizes, cal)

    # EMBED: decode + one forward per row, each extra on its rows
    parts, device_s = [], n * (cal.decode + cal.forward)
    for name, params in extras.items():
        rows = EXTRAS[name].rows(cfg).expected(counts)
        f, b = EXTRAS[name].passes(params, cfg)
        per_row = cal.extras.get(name, (f + 2 * b) * cal.forward)
        parts.append(StageCost(name, rows, _passes(f, b), written=4 * widths[name] * rows, device_seconds=rows * per_row))
        device_s += rows * per_row
    actors = max(1, e.num_actors)
    waves = math.ceil(min(e.num_shards, max(1, n)) / e.shards_per_wave)
    embed = StageCost(
        "embed", n, "decode + 1 F", written=n * (4 * (D + C) + META_ROW_B) + sum(p.written for p in parts), device_seconds=device_s,
        driver=n * (MANIFEST_ROW_B + cal.image_bytes) * 2,  # the rows with their identities, the waves' filtered copies
        worker=ACTOR_BASE + 2 * cal.model_bytes + 3 * e.batch_size * row_b,
        device=cal.model_bytes + e.batch_size * cal.activation_bytes,
        seconds=(0 if cal.ray_running else FIXED["ray_start"]) + waves * FIXED["wave"] + device_s / actors
        + n / e.batch_size * FIXED["batch"] + e.num_shards * FIXED["shard_commit"] + n * row_b / WRITE_BPS / actors,
        parts=parts)
    embed.notes.append(f"a wave's output waits in the object store until written: ≈ {_b(n / waves * row_b)} "
                       f"({waves} waves of embed.shards_per_wave {e.shards_per_wave})")
    stages.append(embed)

    # FIT: partial sums and the KNN/NNGuide banks in one task per features file; other banks load their split
    dets = {d.key: (make_detector(d.name, **d.params), d) for d in cfg.detectors}
    needs = {x for det, _ in dets.values() for x in det.fit_needs}
    files = max(1, e.num_shards)
    id_rows = sum(n_split.values())
    driver, notes = 8.0 * C * D + (8.0 * D * D if "second" in needs else 0), []
    groups: dict[tuple, float] = {}  # the rows each FIT task fitting detectors on rows holds (jobs.stages.fit.row_groups)
    for key, (det, d) in dets.items():
        rows = _bank_rows(det, d, n_split.get(det.fit_split, 0))
        on_driver = True
        if rows:
            cols = sum(widths.get(x, 0) for x in extras if set(EXTRAS[x].provides) & set(det.fit_columns))
            if hasattr(det, "bank_sample"):
                driver += 2 * rows * D * 4
                notes.append(f"{key} bank {rows:,.0f} rows drawn in the workers ({rows * D * 4 / GiB:.2f} GiB)")
            else:
                group = (det.fit_split, det.fit_columns, d.fit_fraction)
                groups[group], on_driver = rows * 4 * (D + 1 + cols), False
                notes.append(f"{key} fits on {rows:,.0f} {det.fit_split} rows in a task ({groups[group] / GiB:.2f} GiB)")
        if "second" in det.fit_needs or det.name in ("pnml", "vim", "residual"):  # a D×D float64 where it fits
            if on_driver:
                driver += 8.0 * D * D
            else:
                groups[group] += 8.0 * D * D
        if det.name == "gmm":
            driver += 8.0 * C * D * D
            notes.append(f"{key}: {C} covariances of {D}² float64 ({8.0 * C * D * D / GiB:.1f} GiB)")
    fit_read = id_rows * 4 * (D + 2) + n_train * 30
    # the fits' work: a D×D decomposition per detector with a covariance, a pass over the rows a detector fits on
    dense = sum("second" in det.fit_needs or det.name in ("vim", "residual", "pnml", "multi_mahalanobis") for det, _ in dets.values())
    on_rows = sum(_bank_rows(det, d, n_split.get(det.fit_split, 0)) for det, d in dets.values() if not hasattr(det, "bank_sample"))
    stages.append(StageCost(
        "fit", n_train, f"reads {fit_read / GiB:.2f} GiB in {files} tasks", driver=driver,
        # a row task: its rows as read shard by shard, their concatenation, a detector's working copy (ViM centres …)
        worker=ACTOR_BASE + max(3 * fit_read / files, 3 * max(groups.values(), default=0.0)), notes=notes,
        seconds=FIXED["fit"] + fit_read / READ_BPS / cal.cpus + n_train * (D * D if "second" in needs else D) * 2 / cal.flops / cal.cpus
        + (30.0 * dense * D**3 + 2.0 * on_rows * D * D) / cal.flops))

    # SCORE: actors (one per CPU) with the fitted detectors, a shard each at a time
    state = sum(_bank_rows(det, d, n_split.get(det.fit_split, 0)) * D * 4 for det, d in dets.values() if hasattr(det, "bank_sample"))
    state += sum(4.0 * C * D for _ in dets) + (8.0 * D * D * sum("second" in det.fit_needs for det, _ in dets.values()))
    flops_row = sum(_score_flops(det, d, n_train, D, C) for det, d in dets.values())
    n_scored = counts_of(counts, cfg, scored=True)  # the feature files are read whole, only these rows scored
    stages.append(StageCost(
        "score", n_scored, f"{len(dets)} detectors", written=n_scored * (4 * len(dets) + META_ROW_B), driver=state,
        worker=ACTOR_BASE + state + 3 * n / files * row_b,
        seconds=FIXED["score"] + n * row_b / READ_BPS / cal.cpus + n_scored * flops_row / cal.flops / cal.cpus))
    scores_b = n_scored * (4 * len(dets) + META_ROW_B) * 2
    # EVALUATE, ERRORS, VERDICTS, GRAPH, EXPLAIN (jobs.plan_stages), with what their driver holds
    driver = {"evaluate": scores_b, "verdicts": 2 * scores_b,
              "errors": 3 * errors_rows(cfg).expected(counts) * 4 * (widths.get("conductance", 0) + widths.get("lcr", 0) + C),
              "graph": 3 * graph_rows(cfg).expected(counts) * 4 * 2 * D}
    for stage in after_score(cfg, sizes, cal, len(dets), n_scored):
        stage.driver = driver.get(stage.name, 0.0)
        stages.append(stage)
    persistent = DRIVER_BASE + cal.model_bytes + n * (MANIFEST_ROW_B + cal.image_bytes)
    return Plan(cfg.experiment, counts, source, cal, stages, persistent, cfg.runtime.max_driver_memory_gb, actors, e.batch_size,
                dict(batches or {}))


def _score_flops(det, d, n_train: int, D: int, C: int) -> float:
    """Rough multiply-adds per scored row: a bank search, a quadratic form, a head product, or ~none."""
    if "features" not in det.requires:
        return 10.0 * C  # the logits or an EMBED column
    if hasattr(det, "bank_sample"):
        return 2.0 * _bank_rows(det, d, n_train) * D
    if "second" in det.fit_needs or det.name in ("vim", "residual", "pnml"):
        return 2.0 * (D * D + C * D)
    return 2.0 * C * D


def counts_of(counts: dict, cfg: JobConfig, scored: bool = False) -> float:
    """Expected rows SCORE's columns are evaluated on (``scored``), else every row of the job."""
    return (scored_rows(cfg) if scored else every_row(cfg)).expected(counts)


def _b(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= 0.1 * GiB else f"{x / 2**20:.0f} MiB"


def _gpu(seconds: float) -> str:
    return f"{seconds / 3600:.3g} GPU-h" if seconds >= 360 else f"{seconds:.3g} GPU-s"


def _t(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def format_plan(plan: Plan, short: bool = False) -> str:
    """The plan as text: a table (or, ``short``, a few lines for the start of a run)."""
    cal, (peak, where) = plan.calibration, plan.driver_peak
    limit = f" (limit {plan.limit:g} GiB)" if plan.limit else ""
    head = (f"plan: {plan.experiment}, {sum(plan.counts.values()):,} rows ({plan.source}); {cal.describe()}")
    total = (f"total: {_gpu(plan.gpu_hours * 3600)} (EMBED actor-time on {cal.device}; {plan.actors} actors), "
             f"about {_t(plan.seconds)} wall; "
             f"driver peak ≈ {_b(peak)} in {where}{limit}")
    if short:
        embed = plan.stage("embed")
        extras = ", ".join(f"{p.name} {p.rows:,.0f} rows" for p in embed.parts)
        return "\n".join([head, f"  embed {_t(embed.seconds)} ({_gpu(embed.device_seconds)}), writes {_b(embed.written)}"
                          + (f"; extras: {extras}" if extras else ""), "  " + total])
    lines = [head, f"{'stage':<14}{'rows':>13}  {'work per row':<28}{'writes':>11}{'driver':>11}{'per worker':>12}{'time':>10}"]
    for s in plan.stages:
        lines.append(f"{s.name:<14}{s.rows:>13,.0f}  {s.work:<28}{_b(s.written):>11}{_b(s.driver):>11}{_b(s.worker):>12}{_t(s.seconds):>10}")
        if s.device:
            lines.append(f"  · per actor on {cal.device}: {_b(s.device)} (the model and a batch of {plan.batch_size} rows' activations)")
        for p in s.parts:
            lines.append(f"  {p.name:<12}{p.rows:>13,.0f}  {p.work:<28}{_b(p.written):>11}{'':>11}{'':>12}{_gpu(p.device_seconds):>14}")
        lines += [f"  · {note}" for note in s.notes]
    lines.append(f"driver base {_b(plan.persistent)} for the whole run (process, model, manifest rows)")
    lines.append(total)
    return "\n".join(lines)


def check_memory(plan: Plan) -> None:
    """Raise :class:`PlanRefused` when the driver peak exceeds ``runtime.max_driver_memory_gb``."""
    peak, where = plan.driver_peak
    if plan.limit is not None and peak > plan.limit * GiB:
        raise PlanRefused(f"runtime.max_driver_memory_gb: the plan estimates {peak / GiB:.2f} GiB of driver memory "
                          f"(in {where}) over the limit of {plan.limit:g} GiB — lower fit_fraction / alpha of the bank "
                          "detectors, or raise the limit (`oodlib plan` shows the stages)")


def make_plan(cfg: JobConfig, model, manifest: str | Path | None = None, quick: bool = False) -> Plan | None:
    """The plan of ``cfg`` (None when the row counts are unknown); ``quick``: calibrate EMBED's
    forward only (the other stages at :data:`jobs.plan_stages.DEFAULT_RATES`)."""
    t0 = time.perf_counter()
    counts, source, batches = row_counts(cfg, manifest)
    if counts is None:
        print(f"plan: row counts unknown — {source}", flush=True)
        return None
    built = time.perf_counter() - t0 if cfg.data.source == "digits" else 0.0  # MANIFEST builds the same sets
    cal = calibrate(cfg, model, quick=quick)
    cal.manifest = built
    if not quick:
        from jobs.calibrate_stages import calibrate_stages

        t0 = time.perf_counter()
        sizes = Sizes(cfg, counts, batches).for_calibration(cal.feature_dim, cal.num_classes, cal.widths.get("conductance", 0))
        cal.rates = calibrate_stages(cfg, model, sizes, cal.forward)
        cal.seconds += time.perf_counter() - t0
    return estimate(cfg, counts, cal, source, batches)


def planning_model(cfg: JobConfig):
    """The configured model for calibration: with its weights when they are here, else the
    architecture with untrained weights (the timing is the same)."""
    from oodlib.models import build_model, load_model

    weights = cfg.model.weights
    if weights is not None and ("/" in weights or Path(weights).suffix) and not Path(weights).exists():
        print(f"plan: model.weights {weights} is not here; calibrating the architecture with untrained weights", flush=True)
        model = build_model(cfg.model.name, cfg.model.num_classes or 1000)
    else:
        model = load_model(cfg.model.name, weights, cfg.model.num_classes)
    model.preprocess = cfg.model.preprocess(model.preprocess)
    return model


def print_run_plan(cfg: JobConfig, model) -> None:
    """The start of a run: the plan in a few lines (quick calibration). Refuses an over-limit plan
    (:class:`PlanRefused`); any other failure to plan is reported and the run goes on."""
    try:
        plan = make_plan(cfg, model, quick=True)
    except Exception as exc:  # the plan is advice: it never stops a run, except by the memory limit
        print(f"plan: not estimated ({type(exc).__name__}: {exc})", flush=True)
        return
    if plan is not None:
        print(format_plan(plan, short=True), flush=True)
        check_memory(plan)


def cli_plan(config: str, overrides: dict, manifest: str | None = None) -> None:
    """``oodlib plan``: print the plan of a config whose data and weights may be elsewhere; raises
    :class:`PlanRefused` over the memory limit, :class:`ConfigError` without row counts."""
    from jobs.config import load_config
    from jobs.config.base import without_path_checks

    with without_path_checks():
        cfg = load_config(config, overrides)
    if manifest is not None and not Path(manifest).is_file():
        raise ConfigError(f"--manifest {manifest} does not exist")
    plan = make_plan(cfg, planning_model(cfg), manifest)
    if plan is None:
        raise ConfigError("no row counts to plan with: give `rows:` for every image set in data.sets, or --manifest")
    print(format_plan(plan), flush=True)
    check_memory(plan)
