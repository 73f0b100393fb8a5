"""EMBED: one decode and one forward per image (plus the configured extras), sharded.

Each image belongs to shard ``sha1(image_id) mod embed.num_shards``; a shard is committed under
its own content key (``tables/features/shard-…``: its rows, the model, the preprocessing, the extras —
inside the published ``features`` Delta table, whose versions reference the shards of each run)
and only new or changed shards are recomputed — within them, rows unchanged since the shard's
last committed version are copied, so added images alone are embedded. The stage directory
(``embed/key=…/index.json``) lists the shard directories; it is committed last.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs import shards, storage
from jobs.config import JobConfig
from jobs.embed_pass import run_embed
from jobs.extras import EXTRAS, ExtraSpec, upstream_stages, wanted_extras
from jobs.rows import extra_rows_column
from jobs.runtime import init_ray
from jobs.stages.base import Context, ShardFiles, Stage, StageResult
from jobs.workers import ModelSpec, StageStalled, gpus_per_actor, model_state_arrays

SHARD_VERSION = 2  # 2: the batch column
COUNTS = ("input", "features", "quarantined")


@dataclass
class EmbedResult(StageResult):
    features: dict[str, Path]  # {shard key: its features directory}, in shard order
    quarantine: list[Path]
    shard_counts: dict

    def counts(self) -> dict:
        return self.shard_counts

    @property
    def feature_dirs(self) -> list[Path]:
        return list(self.features.values())

    def tables(self) -> dict:
        quarantine = [d for d in self.quarantine if storage.committed_rows(d)]
        return {"features": ShardFiles([d.parent for d in self.feature_dirs], "features"),
                **({"quarantine": storage.read_table(quarantine).select(storage.QUARANTINE_SCHEMA.names)} if quarantine else {})}


class EmbedStage(Stage):
    name = "embed"
    version = 1

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest", *upstream_stages(cfg))

    def key(self, ctx: Context, up: dict) -> dict:
        cfg = ctx.cfg
        self._extras = wanted_extras(cfg)
        self._states = {n: EXTRAS[n].state(p, up) for n, p in self._extras.items()}
        # the rows each extra is computed on (jobs.rows): the ``extra_rows`` bit mask, in the extras' order
        self._needs = {n: EXTRAS[n].rows(cfg) for n in self._extras}
        rows = up["manifest"].rows
        self._shard_no = shards.shard_of(rows.column("image_id").to_pylist(), cfg.embed.num_shards)
        self._rows = rows.append_column("shard", pa.array(self._shard_no))
        self._rows = self._rows.append_column("extra_rows", pa.array(extra_rows_column(rows, self._needs)))
        self._identities = shards.row_identities(self._rows)
        extras_key = {n: {"params": p, "state": self._states[n][1], "rows": self._needs[n].key()} for n, p in self._extras.items()}
        self._config = {"model": ctx.model_hash, "preprocess": repr(ctx.model.preprocess), "extras": extras_key,
                        "max_image_bytes": cfg.data.max_image_bytes}
        self._keys = {s: storage.content_key("embed-shard", SHARD_VERSION, shard=h, **self._config)
                      for s, h in shards.shard_hashes(self._rows, self._shard_no, self._identities).items()}
        return {"shards": sorted(self._keys.values())}

    def _shard_dir(self, ctx: Context, key: str) -> storage.StageDir:
        return storage.StageDir(ctx.root / "tables" / "features", key, "shard-")

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        cfg = ctx.cfg
        targets = {s: self._shard_dir(ctx, k) for s, k in self._keys.items()}
        todo = {s: t for s, t in targets.items() if not t.committed()}
        # the last committed version of each shard under the same model and config: its unchanged rows
        # are copied, so adding images re-embeds only the new ones
        latest = ctx.root / self.name / "latest" / storage.content_key("embed-config", SHARD_VERSION, shards=cfg.embed.num_shards, **self._config)
        by_shard: dict[int, list[int]] = {}
        for i, s in enumerate(self._shard_no.tolist()):
            by_shard.setdefault(s, []).append(i)
        fresh = np.ones(self._rows.num_rows, bool)
        reuse: dict[int, tuple[Path, list[str]]] = {}
        for s in todo:
            prev = shards.previous_shard(latest, s)
            if prev is not None:
                known = shards.committed_identities(prev)
                same = [i for i in by_shard[s] if self._identities[i] in known]
                fresh[same] = False
                reuse[s] = (prev, [self._identities[i].split("\x1f", 1)[0] for i in same])
        n_fresh = int(fresh[np.isin(self._shard_no, list(todo))].sum()) if todo else 0
        ctx.progress(f"recomputing {len(todo)} of {len(targets)} shards ({n_fresh} images to embed, "
                     f"{sum(len(r[1]) for r in reuse.values())} reused from earlier versions of those shards)")
        if todo:
            self._embed_waves(ctx, todo, fresh, by_shard, reuse, latest)
        counts = self._counts(targets)
        counts.update(shards_total=len(targets), shards_recomputed=len(todo), images_embedded=n_fresh)
        shards.write_index(tmp, [targets[s].path for s in sorted(targets)], ctx.root, {"counts": counts})
        self._run_counts = counts

    def _embed_waves(self, ctx: Context, todo: dict, fresh: np.ndarray, by_shard: dict, reuse: dict, latest: Path) -> None:
        cfg = ctx.cfg
        ray = init_ray()
        specs = tuple(ExtraSpec(n, p, None if self._states[n][0] is None else ray.put(self._states[n][0]))
                      for n, p in self._extras.items())
        spec = ModelSpec(cfg.model.name, ctx.model.num_classes, ray.put(model_state_arrays(ctx.model)), cfg.model.device, specs,
                         cfg.data.max_image_bytes, ctx.model.preprocess)
        num_gpus = gpus_per_actor(cfg.embed.num_gpus_per_actor)
        if cfg.runtime.stall_timeout_s:  # an actor pool the cluster cannot place fails instead of waiting forever
            ray.data.DataContext.get_current().wait_for_min_actors_s = int(cfg.runtime.stall_timeout_s)
        order = sorted(todo)
        # waves of shards, each committed when done: a crash loses at most one wave's work
        for w in range(0, len(order), cfg.embed.shards_per_wave):
            wave = order[w : w + cfg.embed.shards_per_wave]
            mask = np.isin(self._shard_no, wave) & fresh
            try:
                # by shard (a block, and so a written file, holds one or two shards), then the rows needing
                # the same extras together (full batches for the expensive ones)
                run_embed(
                    self._rows.filter(pa.array(mask)).sort_by([("shard", "ascending"), ("extra_rows", "ascending")]), {s: todo[s] for s in wave}, spec, cfg.embed.batch_size, cfg.embed.num_actors,
                    num_gpus, cfg.embed.cpus_per_actor, ctx.scratch / f"embed-{w}",
                    identities={s: [self._identities[i] for i in by_shard[s]] for s in wave}, reuse={s: reuse[s] for s in wave if s in reuse},
                )
            except ray.exceptions.GetTimeoutError as exc:
                raise StageStalled(f"EMBED: {exc} — an actor needs {cfg.embed.cpus_per_actor:g} CPU and {num_gpus:g} GPU; the "
                                   f"cluster has {ray.cluster_resources()} (runtime.stall_timeout_s sets the wait)") from None
            for s in wave:
                shards.set_previous_shard(latest, s, todo[s].path)
            ctx.progress(f"committed {min(w + len(wave), len(order))} of {len(order)} shards")

    @staticmethod
    def _counts(targets: dict) -> dict:
        per_shard = [json.loads((storage.fetch(t.path) / "counts.json").read_text()) for t in targets.values()]
        return {k: sum(c[k] for c in per_shard) for k in COUNTS}

    def intact(self, ctx: Context, up: dict, path: Path) -> bool:
        return all(self._shard_dir(ctx, k).committed() for k in self._keys.values())

    def load(self, ctx: Context, up: dict, path: Path) -> EmbedResult:
        index = json.loads((path / "index.json").read_text())
        dirs = shards.index_shards(path)
        # reused: nothing was recomputed this time
        counts = getattr(self, "_run_counts", None) or {**index["counts"], "shards_recomputed": 0, "images_embedded": 0}
        return EmbedResult(path, {storage.StageDir.of(d).key: d / "features" for d in dirs}, [d / "quarantine" for d in dirs], counts)
