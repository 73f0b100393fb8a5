"""The main job: MANIFEST → EMBED → FIT → SCORE → EVALUATE, logged to MLflow.

    python -m jobs.nightly --config configs/digits.yaml [--set embed.batch_size=128] [--schedule nightly]

This is what ``ray job submit`` runs. The config is validated before Ray starts (exit code 2 on
a bad config, naming the field). Stages whose content key is already committed are reused.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

# jobs.errors, jobs.graph and jobs.explain are imported by the stage that uses them: they pull in
# scikit-learn, torch-geometric and torchvision, seconds a job without those stages should not pay
from jobs import embed, evaluate, fit, score, shards, storage, tracking
from jobs.extras import ExtraSpec
from jobs.config import ConfigError, JobConfig, load_config
from oodlib.data.digits import build_digits
from oodlib.data.manifest import (
    ManifestError, manifest_from_cifar_binary, manifest_from_image_folder, manifest_from_image_sets, manifest_from_list_file,
    manifest_from_npy,
    read_manifest, row_problems, spread_sample,
)
from oodlib.data.longtail import long_tail_split
from oodlib.detectors import Detector, Head, make_detector
from oodlib.models import ModelAdapter, WeightsError, load_model

log = logging.getLogger("oodlib.nightly")
MANIFEST_VERSION = 2
EVALUATE_VERSION = 1


@dataclass
class StageLog:
    """What each stage did (reused or computed), for the summary and last_run.json."""

    paths: dict[str, str] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)

    def record(self, stage: str, target: storage.StageDir, reused: bool, seconds: float) -> None:
        self.paths[stage] = str(target.path)
        self.reused[stage] = reused
        self.seconds[stage] = round(seconds, 2)
        print(f"[{stage}] {'reused committed result' if reused else 'computed'} in {seconds:.1f}s → {target.path}", flush=True)


# --- inputs ---


def prepare_manifest(cfg: JobConfig) -> tuple[pa.Table, str, Path]:
    """The full manifest, its content hash and where it lives (digits: generated and committed)."""
    if cfg.data.source == "manifest":
        path = Path(cfg.data.manifest)
        return read_manifest(path, strict=False), storage.file_hash(path), path
    if cfg.data.source == "folders":
        return folders_manifest(cfg)
    key = storage.content_key("manifest", MANIFEST_VERSION, source="digits", seed=cfg.data.seed)
    target = storage.stage_dir(cfg.output, cfg.experiment, "manifest", key)
    if not target.done:
        with target.writing() as tmp:
            storage.write_table(manifest_from_image_sets(build_digits(cfg.data.seed)), tmp, "manifest.parquet")
    path = target.path / "manifest.parquet"
    return read_manifest(path), key, path


def folders_manifest(cfg: JobConfig) -> tuple[pa.Table, str, Path]:
    """Manifest of the configured image sets on disk, committed under a key of their listing
    (paths, sizes and mtimes), so a changed folder gives a new manifest and only its shards re-embed."""
    tables = []
    for s in cfg.data.sets:
        if s.kind == "imagefolder":
            t = manifest_from_image_folder(s.root, s.dataset, s.split, ood=s.ood)
        elif s.kind == "list":
            t = manifest_from_list_file(s.list_file, s.root, s.dataset, s.split)
        elif s.kind == "npy":
            t = manifest_from_npy(s.root, s.dataset, s.split)
        else:
            # CIFAR-10: data_batch_1..5.bin / test_batch.bin; CIFAR-100: train.bin / test.bin
            patterns = ("test_batch.bin", "test.bin") if s.split == "test" else ("data_batch_*.bin", "train.bin")
            files = [f for p in patterns for f in sorted(Path(s.root).glob(p))]
            t = manifest_from_cifar_binary(files, s.dataset, s.split, 100 if s.kind == "cifar100-binary" else 10, s.ood)
        tables += long_tail_tables(t, s.imbalance_ratio, s.val_per_class) if s.imbalance_ratio else [t]
    table = pa.concat_tables(tables)
    listing = shards.shard_hashes(table, np.zeros(table.num_rows, np.int32))[0]
    key = storage.content_key("manifest", MANIFEST_VERSION, source="folders", listing=listing)
    target = storage.stage_dir(cfg.output, cfg.experiment, "manifest", key)
    if not target.done:
        with target.writing() as tmp:
            storage.write_table(table, tmp, "manifest.parquet")
    return table, key, target.path / "manifest.parquet"


def long_tail_tables(table: pa.Table, imbalance_ratio: float, val_per_class: int | None) -> list[pa.Table]:
    """A long-tailed train table and a balanced ``val`` table from a balanced labelled set."""
    train_idx, val_idx, _ = long_tail_split(table.column("label").to_numpy(), imbalance_ratio, val_per_class=val_per_class)
    val = table.take(pa.array(val_idx))
    val = val.set_column(val.schema.get_field_index("split"), "split", pa.array(["val"] * val.num_rows, pa.string()))
    ids = [i.replace("/train/", "/val/", 1) for i in val.column("image_id").to_pylist()]
    val = val.set_column(0, "image_id", pa.array(ids, pa.string()))
    return [table.take(pa.array(train_idx)), val]


def select_rows(manifest: pa.Table, cfg: JobConfig, num_classes: int) -> tuple[pa.Table, pa.Table]:
    """Rows of the configured datasets (every split), at most ``limit_per_split`` per (dataset, split)
    (:func:`~oodlib.data.manifest.spread_sample`: every subset and class, evenly spaced in manifest order),
    split into usable rows and quarantined ones (duplicate ids, bad labels … with the reason).

    Raises :class:`ConfigError` naming the config field when a dataset is not in the manifest.
    """
    present = set(manifest.column("dataset").to_pylist())
    wanted = {"data.id_dataset": [cfg.data.id_dataset], "data.ood_datasets": cfg.data.ood_datasets, "data.extra_datasets": cfg.data.extra_datasets}
    for fname, names in wanted.items():
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(f"{fname}: dataset(s) {missing} not in the manifest (has {sorted(present)})")
    if cfg.graph.enabled:
        wanted["graph.train_dataset"] = [cfg.graph.train_dataset]
        wanted["graph.oe_dataset"] = [cfg.graph.oe_dataset]
        missing = [n for n in wanted["graph.train_dataset"] + wanted["graph.oe_dataset"] if n not in present]
        if missing:
            raise ConfigError(f"graph: dataset(s) {missing} not in the manifest (has {sorted(present)})")
    datasets = list(dict.fromkeys(n for names in wanted.values() for n in names))
    table = manifest.filter(pc.is_in(manifest.column("dataset"), pa.array(datasets)))
    if cfg.data.limit_per_split:
        keys = np.char.add(np.asarray(table.column("dataset").to_pylist(), str), np.asarray(table.column("split").to_pylist(), str))
        labels = np.asarray(table.column("label").fill_null(-1).to_numpy(zero_copy_only=False))
        subsets = np.asarray(table.column("subset").fill_null("").to_pylist(), str)
        keep = np.zeros(len(keys), bool)
        for k in np.unique(keys):
            rows = np.flatnonzero(keys == k)
            keep[rows[spread_sample(labels[rows], cfg.data.limit_per_split, subsets[rows])]] = True
        table = table.filter(pa.array(keep))
    reasons = row_problems(table, num_classes)
    bad = pa.array([r is not None for r in reasons])
    quarantined = table.filter(bad).select(["image_id", "dataset", "split"])
    quarantined = quarantined.append_column("stage", pa.array(["manifest"] * quarantined.num_rows, pa.string()))
    quarantined = quarantined.append_column("reason", pa.array([r for r in reasons if r is not None], pa.string()))
    table = table.filter(pc.invert(bad))
    id_test = table.filter(pc.and_(pc.equal(table.column("dataset"), cfg.data.id_dataset), pc.equal(table.column("split"), "test")))
    id_train = table.filter(pc.and_(pc.equal(table.column("dataset"), cfg.data.id_dataset), pc.equal(table.column("split"), "train")))
    if id_test.num_rows == 0 or id_train.num_rows == 0:
        raise ConfigError(f"data.id_dataset: {cfg.data.id_dataset!r} needs train and test rows in the manifest")
    return table, quarantined


def build_detectors(cfg: JobConfig) -> dict[str, Detector]:
    """Configured detectors keyed by column name (``score_<key>``)."""
    out = {}
    for d in cfg.detectors:
        try:
            out[d.key] = make_detector(d.name, **d.params)
        except TypeError as exc:
            raise ConfigError(f"detectors[{d.key}].params: {exc}") from None
    return out


def load_job_model(cfg: JobConfig) -> ModelAdapter:
    """The configured model on the driver (for hashing, the head, and shipping to actors)."""
    num_classes = cfg.model.num_classes or 1000
    return load_model(cfg.model.name, cfg.model.weights, num_classes)


# --- Ray ---


def private_token_file(path: Path | None = None, create: bool = True) -> Path | None:
    """Make the default Ray token file (``~/.ray/auth_token``) owner-only.

    Ray writes a generated token with the process umask (often world-readable), and whoever can
    read it can run code on the cluster. With no token given by ``$RAY_AUTH_TOKEN`` or
    ``$RAY_AUTH_TOKEN_PATH``, this creates the file with mode 0600 when it is missing and ``create``
    (256 random bits, as Ray generates them; not when joining a cluster, whose token must be given)
    and removes group/other access when it has any. Returns the file it manages, or None when the
    token comes from the environment.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = path or Path.home() / ".ray" / "auth_token"
    if not create and not path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by other users; restricting it to its owner (0600)", path)
            path.chmod(0o600)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def init_ray() -> None:
    """Connect to ``$RAY_ADDRESS`` (or the cluster this job was submitted to), else start local Ray
    with token authentication (an owner-only token file)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    private_token_file(create=not os.environ.get("RAY_ADDRESS"))
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None)


# --- the job ---


def commit_manifest_quarantine(cfg: JobConfig, manifest_hash: str, rejected: pa.Table) -> storage.StageDir:
    """Commit the manifest rows that cannot be used (``quarantine/key=…/manifest.parquet``)."""
    key = storage.content_key("quarantine", MANIFEST_VERSION, manifest=manifest_hash, ids=rejected.column("image_id").to_pylist())
    target = storage.stage_dir(cfg.output, cfg.experiment, "quarantine", key)
    if not target.done:
        with target.writing() as tmp:
            storage.write_table(rejected.cast(embed.QUARANTINE_SCHEMA), tmp, "manifest.parquet")
    return target


def id_rows_hash(rows: pa.Table) -> str:
    """Content hash of a set of manifest rows (e.g. the ID-train rows FIT depends on)."""
    return shards.shard_hashes(rows, np.zeros(rows.num_rows, np.int32))[0]


def id_train_hash(selected: pa.Table, id_dataset: str) -> str:
    """Content hash of the ID-train rows: what FIT depends on (not the other shards' rows)."""
    mask = pc.and_(pc.equal(selected.column("dataset"), id_dataset), pc.equal(selected.column("split"), "train"))
    return id_rows_hash(selected.filter(mask))


def run_explain_stage(
    cfg: JobConfig, model: ModelAdapter, model_hash: str, selected: pa.Table, scores_key: str, score_dirs: list[Path], stages: StageLog,
) -> list[Path]:
    """EXPLAIN a selected sample (reused when scores, model and explain config are unchanged)."""
    from jobs import explain

    t0 = time.time()
    loc = cfg.explain.localization_data  # ground truth on disk: its list file and folders by stat
    truth = None if loc is None else [shards.row_digest(None, str(p)) for p in (loc.list_file, loc.masks_dir or loc.voc_dir)]
    key = storage.content_key("explain", explain.STAGE_VERSION, scores=scores_key, model=model_hash,
                              explain=cfg.explain.model_dump(), truth=truth)
    target = storage.stage_dir(cfg.output, cfg.experiment, "explain", key)
    reused = target.done
    if not reused:
        init_ray()
        import ray

        scores_df = storage.read_table(score_dirs).to_pandas()
        num_gpus = embed.gpus_per_actor(cfg.embed.num_gpus_per_actor)
        explain.run_explain(cfg, model, ray.put(embed.model_state_arrays(model)), selected, scores_df, target, num_gpus)
    stages.record("explain", target, reused, time.time() - t0)
    return sorted(target.path.glob("*.png")) + sorted(target.path.glob("*.md")) + sorted(target.path.glob("localization.parquet"))


def run_errors_stage(cfg: JobConfig, features: dict[str, Path], stages: StageLog) -> pd.DataFrame:
    """ERRORS: error detectors, fusions and tables (reused when features and config are unchanged)."""
    from jobs import errors

    t0 = time.time()
    key = storage.content_key("errors", errors.STAGE_VERSION, features=sorted(features), errors=cfg.errors.model_dump(), id=cfg.data.id_dataset)
    target = storage.stage_dir(cfg.output, cfg.experiment, "errors", key)
    reused = target.done
    if not reused:
        tau = json.loads((Path(stages.paths["mutants"]) / "sprt.json").read_text())["tau"]
        errors.run_errors(cfg, list(features.values()), tau, target)
    stages.record("errors", target, reused, time.time() - t0)
    return pq.read_table(target.path / "metrics.parquet").to_pandas()


def run_graph_stage(cfg: JobConfig, model: ModelAdapter, features: dict[str, Path], stages: StageLog) -> pd.DataFrame:
    """GRAPH on the long-tailed set (reused when the features and the graph config are unchanged)."""
    from jobs import graph

    t0 = time.time()
    key = storage.content_key(
        "graph", graph.STAGE_VERSION, features=sorted(features), graph=cfg.graph.model_dump(),
        id=cfg.data.id_dataset, ood=cfg.graph.ood_datasets or cfg.data.ood_datasets,
    )
    target = storage.stage_dir(cfg.output, cfg.experiment, "graph", key)
    reused = target.done
    if not reused:
        graph.run_graph(cfg, list(features.values()), model.num_classes, target)
    stages.record("graph", target, reused, time.time() - t0)
    return pq.read_table(target.path / "metrics.parquet").to_pandas()


def run(cfg: JobConfig, schedule: str | None = None, config_path: str = "", embed_cfg: JobConfig | None = None, post_stages: bool = True) -> dict:
    """Run every stage for ``cfg``; returns the summary written to ``last_run.json``.

    ``embed_cfg``: the config whose EMBED extras apply (a sweep passes its base config, so the
    stored features are reused); ``post_stages=False`` skips GRAPH and EXPLAIN.
    """
    started = time.time()
    stages = StageLog()
    exp_root = Path(cfg.output) / cfg.experiment
    manifest, manifest_hash, manifest_path = prepare_manifest(cfg)
    model = load_job_model(cfg)
    selected, rejected = select_rows(manifest, cfg, model.num_classes)
    detectors = build_detectors(cfg)
    model_hash = model.weights_hash()
    head = Head(*model.head_arrays())
    print(
        f"[manifest] {manifest.num_rows} images in {manifest_path}; selected {selected.num_rows + rejected.num_rows} "
        f"for this job, {rejected.num_rows} quarantined (bad manifest rows)", flush=True,
    )
    quarantine = commit_manifest_quarantine(cfg, manifest_hash, rejected)
    scratch = exp_root / ".scratch" / uuid.uuid4().hex[:8]
    try:
        extras, extras_key = embed_extras(embed_cfg or cfg, selected, model, model_hash, stages)
        features = run_embed_stage(cfg, selected, model, model_hash, extras, extras_key, scratch, stages)
        stages.counts["embed"]["input"] += rejected.num_rows
        stages.counts["embed"]["quarantined"] += rejected.num_rows
        stages.paths["quarantine"] = str(quarantine.path)
        fit_key = run_fit_stage(cfg, selected, model, model_hash, head, detectors, features, stages)
        score_dirs, scores_key = run_score_stage(cfg, fit_key, features, detectors, scratch, stages)
        metrics_df, eval_dir = run_evaluate_stage(cfg, scores_key, score_dirs, stages)
        explain_artifacts = []
        if post_stages and cfg.errors.enabled:
            metrics_df = pd.concat([metrics_df, run_errors_stage(cfg, features, stages)], ignore_index=True)
        if post_stages and cfg.graph.enabled:
            metrics_df = pd.concat([metrics_df, run_graph_stage(cfg, model, features, stages)], ignore_index=True)
        if post_stages and cfg.explain.enabled:
            explain_artifacts = run_explain_stage(cfg, model, model_hash, selected, scores_key, score_dirs, stages)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    run_id = uuid.uuid4().hex[:12]
    mlflow_run_id, uri = None, None
    if cfg.mlflow.enabled:
        uri = tracking.tracking_uri(cfg.mlflow.tracking_uri, Path(cfg.output))
        tags = {
            "schedule": schedule or cfg.schedule, "git_sha": tracking.git_sha(), "model_hash": model_hash,
            "manifest_hash": manifest_hash, "config_hash": cfg.digest(), "oodlib_run_id": run_id, "model": cfg.model.name,
        }
        mlflow_run_id = tracking.log_job(uri, cfg, tags, config_path, stages.counts["embed"], metrics_df, eval_dir, detectors, explain_artifacts)

    summary = {
        "run_id": run_id, "experiment": cfg.experiment, "config": config_path, "config_hash": cfg.digest(),
        "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking.redact_uri(uri), "manifest": str(manifest_path), "manifest_hash": manifest_hash,
        "model_hash": model_hash, "stages": stages.paths, "reused": stages.reused, "seconds": stages.seconds,
        "counts": stages.counts, "total_seconds": round(time.time() - started, 2),
    }
    embed_s = stages.seconds.get("embed", 0.0)
    if not stages.reused.get("embed") and embed_s > 0:
        summary["throughput_images_per_s"] = round(stages.counts["embed"]["features"] / embed_s, 1)
    if mlflow_run_id:
        tracking.log_summary(uri, mlflow_run_id, summary)
    exp_root.mkdir(parents=True, exist_ok=True)
    (exp_root / "last_run.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, metrics_df)
    return summary


def embed_extras(cfg: JobConfig, selected: pa.Table, model: ModelAdapter, model_hash: str, stages: StageLog) -> tuple[list, dict]:
    """The per-image extras EMBED computes (with their fitted state) and what keys them."""
    extras, keys = [], {}
    for d in cfg.detectors:
        if d.name == "odin":
            extras.append(("odin", dict(d.params), None))
            keys["odin"] = dict(d.params)
    if cfg.errors.enabled:
        from jobs import errors

        e = cfg.errors
        extras.append(("conductance", {"layer": e.layer, "n_steps": e.n_steps, "method": e.method}, None))
        keys["conductance"] = {"layer": e.layer, "n_steps": e.n_steps, "method": e.method}
        t0 = time.time()
        mutant_state, path = errors.mutants_stage(cfg, selected, model, model_hash, id_rows_hash)
        extras.append(("lcr", {"early_stop": e.sprt.early_stop}, mutant_state))
        keys["lcr"] = {"mutants": path.name, "early_stop": e.sprt.early_stop}
        stages.paths["mutants"] = str(path)
        stages.seconds["mutants"] = round(time.time() - t0, 2)
    if cfg.graph.enabled:
        from jobs import graph

        t0 = time.time()
        lt = graph.lt_train_rows(selected, cfg.graph.train_dataset)
        gmodel, path = graph.gaussianized_model(cfg, lt, model, model_hash, id_rows_hash(lt))
        extras.append(("gfeatures", {}, embed.model_state_arrays(gmodel)))
        keys["gfeatures"] = path.name
        stages.paths["gaussianized"] = str(path)
        stages.seconds["gaussianized"] = round(time.time() - t0, 2)
    return extras, keys


def run_embed_stage(
    cfg: JobConfig, selected: pa.Table, model: ModelAdapter, model_hash: str, extras: list, extras_key: dict,
    scratch: Path, stages: StageLog,
) -> dict[str, Path]:
    """EMBED the shards whose content key is not committed yet; returns {shard key: features dir}."""
    t0 = time.time()
    shard_no = shards.shard_of(selected.column("image_id").to_pylist(), cfg.embed.num_shards)
    selected = selected.append_column("shard", pa.array(shard_no))
    identities = shards.row_identities(selected)
    stage_cfg = {"model": model_hash, "preprocess": repr(model.preprocess), "extras": extras_key}
    keys = {s: storage.content_key("embed-shard", embed.STAGE_VERSION, shard=h, **stage_cfg)
            for s, h in shards.shard_hashes(selected, shard_no, identities).items()}
    root = Path(cfg.output) / cfg.experiment / "embed"
    targets = {s: storage.StageDir(root / "shards", k) for s, k in keys.items()}
    todo = {s: t for s, t in targets.items() if not t.done}
    # the last committed version of each shard under the same model and config: its unchanged rows
    # are copied, so adding images re-embeds only the new ones
    latest = root / "latest" / storage.content_key("embed-config", embed.STAGE_VERSION, shards=cfg.embed.num_shards, **stage_cfg)
    by_shard: dict[int, list[int]] = {}
    for i, s in enumerate(shard_no.tolist()):
        by_shard.setdefault(s, []).append(i)
    fresh = np.ones(selected.num_rows, bool)
    reuse: dict[int, tuple[Path, list[str]]] = {}
    for s in todo:
        prev = shards.previous_shard(latest, s)
        if prev is not None:
            known = shards.committed_identities(prev)
            same = [i for i in by_shard[s] if identities[i] in known]
            fresh[same] = False
            reuse[s] = (prev, [identities[i].split("\x1f", 1)[0] for i in same])
    n_fresh = int(fresh[np.isin(shard_no, list(todo))].sum()) if todo else 0
    print(f"[embed] recomputing {len(todo)} of {len(targets)} shards ({n_fresh} images to embed, "
          f"{sum(len(r[1]) for r in reuse.values())} reused from earlier versions of those shards)", flush=True)
    if todo:
        init_ray()
        import ray

        specs = tuple(ExtraSpec(name, params, None if state is None else ray.put(state)) for name, params, state in extras)
        spec = embed.ModelSpec(cfg.model.name, model.num_classes, ray.put(embed.model_state_arrays(model)), cfg.model.device, specs)
        num_gpus = embed.gpus_per_actor(cfg.embed.num_gpus_per_actor)
        order = sorted(todo)
        # waves of shards, each committed when done: a crash loses at most one wave's work
        for w in range(0, len(order), cfg.embed.shards_per_wave):
            wave = order[w : w + cfg.embed.shards_per_wave]
            mask = np.isin(shard_no, wave) & fresh
            embed.run_embed(
                selected.filter(pa.array(mask)), {s: todo[s] for s in wave}, spec, cfg.embed.batch_size, cfg.embed.num_actors,
                num_gpus, cfg.embed.cpus_per_actor, scratch / f"embed-{w}",
                identities={s: [identities[i] for i in by_shard[s]] for s in wave}, reuse={s: reuse[s] for s in wave if s in reuse},
            )
            for s in wave:
                shards.set_previous_shard(latest, s, todo[s].path)
            print(f"[embed] committed {min(w + len(wave), len(order))} of {len(order)} shards", flush=True)
    per_shard = {s: json.loads((t.path / "counts.json").read_text()) for s, t in targets.items()}
    counts = {k: sum(c[k] for c in per_shard.values()) for k in ("input", "features", "quarantined")}
    counts.update(shards_total=len(targets), shards_recomputed=len(todo), images_embedded=n_fresh)
    index = storage.StageDir(root, storage.content_key("embed", embed.STAGE_VERSION, shards=sorted(keys.values())))
    reused = index.done
    if not reused:
        shards.write_index(index, [targets[s].path for s in sorted(targets)], {"counts": counts})
    stages.counts["embed"] = counts
    stages.record("embed", index, reused and not todo, time.time() - t0)
    return {keys[s]: targets[s].path / "features" for s in sorted(targets)}


def run_fit_stage(
    cfg: JobConfig, selected: pa.Table, model: ModelAdapter, model_hash: str, head: Head,
    detectors: dict[str, Detector], features: dict[str, Path], stages: StageLog,
) -> str:
    """FIT on the ID-train rows (keyed by their content, so new test images do not refit)."""
    t0 = time.time()
    det_cfg = [d.model_dump() for d in cfg.detectors]
    key = storage.content_key(
        "fit", fit.STAGE_VERSION, model=model_hash, train=id_train_hash(selected, cfg.data.id_dataset),
        detectors=det_cfg, preprocess=repr(model.preprocess),
    )
    target = storage.stage_dir(cfg.output, cfg.experiment, "fitted", key)
    reused = target.done
    dirs = list(features.values())
    train_filter = (pc.field("dataset") == cfg.data.id_dataset) & (pc.field("split") == "train")
    if not reused:
        init_ray()
        stats = fit.train_stats(dirs, cfg.data.id_dataset, model.num_classes, model.feature_dim, fit.needs(detectors))

        def load_train() -> tuple[np.ndarray, np.ndarray]:
            table = storage.read_table(dirs, ["features", "label"], filter=train_filter)
            return storage.vector_to_numpy(table.column("features")), table.column("label").to_numpy()

        fit.fit_detectors(detectors, stats, head, load_train)
        with target.writing() as tmp:
            fit.save_fitted(tmp, head, stats, detectors)
    else:
        fit.load_fitted_detectors(target, detectors)
    stages.record("fit", target, reused, time.time() - t0)
    return key


def run_score_stage(
    cfg: JobConfig, fit_key: str, features: dict[str, Path], detectors: dict[str, Detector], scratch: Path, stages: StageLog,
) -> tuple[list[Path], str]:
    """SCORE the shards whose (fit, embed shard) key is not committed; returns the score dirs and index key."""
    t0 = time.time()
    root = Path(cfg.output) / cfg.experiment / "scores"
    keys = {e: storage.content_key("score-shard", score.STAGE_VERSION, fit=fit_key, embed=e) for e in features}
    targets = {e: storage.StageDir(root / "shards", k) for e, k in keys.items()}
    todo = {e: t for e, t in targets.items() if not t.done}
    print(f"[score] recomputing {len(todo)} of {len(targets)} shards", flush=True)
    if todo:
        init_ray()
        with_rows = {e: features[e] for e in todo if storage.parquet_rows(features[e])}
        if with_rows:
            score.run_score(with_rows, {e: todo[e] for e in with_rows}, detectors, scratch / "score")
        for e in set(todo) - set(with_rows):  # every image of the shard was quarantined
            shards.commit_shard(todo[e], {"scores": None}, {"rows": 0})
    index = storage.StageDir(root, storage.content_key("scores", score.STAGE_VERSION, shards=sorted(keys.values())))
    reused = index.done
    if not reused:
        shards.write_index(index, [targets[e].path for e in sorted(targets)], {})
    stages.record("score", index, reused and not todo, time.time() - t0)
    return [targets[e].path / "scores" for e in sorted(targets)], index.key


def run_evaluate_stage(cfg: JobConfig, scores_key: str, score_dirs: list[Path], stages: StageLog) -> tuple[pd.DataFrame, storage.StageDir]:
    """Metrics table, results table and plots (reused when the scores and the evaluation sets are unchanged)."""
    t0 = time.time()
    key = storage.content_key("evaluate", EVALUATE_VERSION, scores=scores_key, id=cfg.data.id_dataset, ood=cfg.data.ood_datasets)
    target = storage.stage_dir(cfg.output, cfg.experiment, "metrics", key)
    reused = target.done
    if not reused:
        scores_df = storage.read_table(score_dirs).to_pandas()
        scores_df["dataset"] = scores_df["dataset"].astype(str)
        rows = evaluate.ood_metric_rows(scores_df, cfg.data.id_dataset, cfg.data.ood_datasets) + evaluate.classify_rows(scores_df, cfg.data.id_dataset)
        metrics = evaluate.metrics_table(rows)
        with target.writing() as tmp:
            storage.write_table(metrics, tmp, "metrics.parquet")
            evaluate.plot_roc_and_histograms(scores_df, cfg.data.id_dataset, cfg.data.ood_datasets, tmp / "plots")
            (tmp / "results.md").write_text(evaluate.results_markdown(metrics.to_pandas()))
    stages.record("evaluate", target, reused, time.time() - t0)
    return pq.read_table(target.path / "metrics.parquet").to_pandas(), target


def print_summary(summary: dict, metrics_df: pd.DataFrame) -> None:
    print("\n" + evaluate.results_markdown(metrics_df))
    c = summary["counts"].get("embed", {})
    print(f"\nimages: {c.get('input')} in, {c.get('features')} embedded, {c.get('quarantined')} quarantined"
          + (f"; EMBED {summary['throughput_images_per_s']} images/s" if "throughput_images_per_s" in summary else ""))
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    print(f"shards: recomputed {c.get('shards_recomputed')} of {c.get('shards_total')} (EMBED)")
    print(f"outputs: {Path(summary['stages']['evaluate']).parent.parent} (last_run.json lists every stage path)")
    if summary["tracking_uri"]:
        print(f"MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
        print(f"  look at it: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1")
    print(f"done in {summary['total_seconds']:.1f}s")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="job config YAML (e.g. configs/digits.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--schedule", default=None, help="tag for the MLflow runs (manual, nightly, …)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return exit_code(lambda: run(load_config(args.config, parse_overrides(args.set)), args.schedule, args.config))


def exit_code(action) -> int:
    """Run ``action``; input problems (config, manifest, weights) print a message and give exit
    code 2 instead of a traceback. Shared by every job entry point."""
    try:
        action()
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WeightsError as exc:
        print(f"error: model.weights: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
