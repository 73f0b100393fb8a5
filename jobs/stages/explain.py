"""EXPLAIN: relevance maps for a selected sample of images, and the localization benchmark.

Selection (from the scores table): wrong predictions, the most uncertain ID images, the OOD
images a detector finds most ID-like, and a seeded random sample. Maps are computed in one Ray
task (a GPU when the cluster has one) and written as Parquet (one row per image and method,
float16), with PNG grids (image | method maps). The localization benchmark — on the embedded
set (digits pasted on photo patches at known positions) or on ground truth on disk
(segmentation masks or VOC boxes, ``explain.localization_data``) — gives the metrics tables of
RAP Table 1 and AE Tables 1–3 plus the AE ablation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from jobs import storage
from jobs.config import JobConfig
from jobs.runtime import init_ray
from jobs.sanity import gradcam_warning
from jobs.shards import row_digest
from jobs.stages.base import Child, Context, Stage, StageResult
from jobs.workers import gpus_per_actor, model_state_arrays, rebuild_model
from oodlib.attribution import AE_ABLATION
from oodlib.attribution.maps import compute_maps, display_images, localization_benchmark
from oodlib.attribution.selection import select_images
from oodlib.data.decode import decode_batch
from oodlib.device import resolve_device
from oodlib.reporting.attribution import render_grid
from oodlib.reporting.tables import localization_markdown
from oodlib.verdicts import top_flagged

MAPS_SCHEMA_FIELDS = ["image_id", "reason", "method", "pred", "label", "height", "width", "map"]


@dataclass
class ExplainResult(StageResult):
    artifacts: list[Path]
    warnings: list[str] = field(default_factory=list)

    def children(self, ctx: Context) -> list[Child]:
        metrics = {}
        loc = self.path / "localization.parquet"
        if loc.exists():
            table = pd.read_parquet(loc).melt(id_vars="method", var_name="metric", value_name="value")
            for r in table.itertuples():
                metrics[f"{r.method.replace('[', '_').replace(']', '').replace('+', '_')}.{r.metric}"] = float(r.value)
        return [Child("explain", ctx.cfg.explain.model_dump(), metrics, self.artifacts)]


class ExplainStage(Stage):
    name = "explain"
    version = 4  # 2: localization maps explain the labelled class; 4: top flagged incoming images

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.explain.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest", "score", *(("verdicts",) if cfg.verdicts.enabled else ()))

    def key(self, ctx: Context, up: dict) -> dict:
        loc = ctx.cfg.explain.localization_data  # ground truth on disk: its list file and folder by stat
        truth = None if loc is None else [row_digest(None, str(p)) for p in (loc.list_file, loc.masks_dir or loc.voc_dir)]
        return {"scores": up["score"].path.name, "model": ctx.model_hash, "explain": ctx.cfg.explain.model_dump(), "truth": truth,
                "verdicts": up["verdicts"].path.name if "verdicts" in up else None}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        ray = init_ray()
        ex, model = ctx.cfg.explain, ctx.model
        chosen = select(up["score"].read(), dict(ex.counts), ex.seed)
        if "verdicts" in up:  # the report shows the top flagged images of every incoming batch with their maps
            flagged = flagged_selection(up["verdicts"].verdicts, ctx.cfg.data.incoming_datasets, ctx.cfg.verdicts.top_k)
            chosen = pd.concat([chosen[~chosen.image_id.isin(flagged.image_id)], flagged], ignore_index=True)
        rows = up["manifest"].rows
        rows = rows.filter(pc.is_in(rows.column("image_id"), pa.array(chosen.image_id.tolist())))
        order = {iid: i for i, iid in enumerate(rows.column("image_id").to_pylist())}
        rows = rows.take(pa.array([order[i] for i in chosen.image_id]))
        localization = {
            "n": ex.localization_images, "methods": ex.methods + [f"ae[{k}]" for k in AE_ABLATION],
            "data": None if ex.localization_data is None else ex.localization_data.model_dump(mode="json"),
        } if ex.localization else None
        ctx.progress(f"{len(chosen)} images × {len(ex.methods)} methods"
                     + (f"; localization benchmark on {ex.localization_images} images" if localization else ""))
        task = ray.remote(explain_task).options(num_gpus=gpus_per_actor(ctx.cfg.embed.num_gpus_per_actor), num_cpus=1)
        result = ray.get(task.remote(ray.put(model_state_arrays(model)), model.name, model.num_classes, model.preprocess,
                                     rows.column("image").to_pylist(), rows.column("path").to_pylist(), ex.methods, localization,
                                     ctx.cfg.data.max_image_bytes))
        labels = np.asarray(rows.column("label").to_pylist())
        storage.write_table(maps_table(chosen, labels, result["maps"], result["pred"]), tmp, "maps.parquet")
        pics = display_images(result["inputs"], model.preprocess)
        for reason, group in chosen.reset_index(drop=True).groupby("reason", sort=False):
            idx = group.index.to_numpy()
            titles = [f"{reason}: y={labels[i]} ŷ={result['pred'][i]}" for i in idx]
            render_grid(pics[idx], {m: v[idx] for m, v in result["maps"].items()}, tmp / f"maps_{reason}.png", titles)
        if "localization" in result:
            table, lerf = result["localization"]["table"], result["localization"]["lerf"]
            storage.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp, "localization.parquet")
            storage.write_table(pa.Table.from_pandas(lerf, preserve_index=False), tmp, "lerf.parquet")
            (tmp / "localization.md").write_text(localization_markdown(table))

    def load(self, ctx: Context, up: dict, path: Path) -> ExplainResult:
        artifacts = sorted(path.glob("*.png")) + [p for p in (path / "localization.md",) if p.exists()]
        warning = gradcam_warning(ctx.model) if "gradcam" in ctx.cfg.explain.methods else None
        return ExplainResult(path, artifacts, [warning] if warning else [])


def explain_task(spec_state: dict, model_name: str, num_classes: int, preprocess, images: list, paths: list, methods: list[str],
                 localization: dict | None, max_bytes: int):
    """Runs in a Ray task: decode, compute maps, and (optionally) the localization benchmark."""
    device = resolve_device("auto")
    model = rebuild_model(model_name, num_classes, spec_state, device, preprocess)
    x, reasons = decode_batch(images, paths, model.preprocess, max_bytes)
    maps, preds = compute_maps(model, x.to(device), methods)
    result = {"maps": maps, "pred": preds, "reasons": reasons, "inputs": x.numpy()}
    if localization is not None:
        result["localization"] = localization_benchmark(model, localization["n"], localization["methods"], device, localization["data"])
    return result


def select(scores: pd.DataFrame, counts: dict, seed: int) -> pd.DataFrame:
    """Images to explain from the scores table (confidence = MSP; OOD risk = the first other score column)."""
    ood_col = next(c for c in scores.columns if c.startswith("score_") and c != "score_msp")
    return select_images(scores.image_id, scores.pred, scores.label, scores.score_msp, scores[ood_col], counts, seed)


def flagged_selection(verdicts: pd.DataFrame, incoming: list[str], k: int) -> pd.DataFrame:
    """The ``k`` top flagged images (:func:`oodlib.verdicts.top_flagged`) of every incoming batch:
    ``image_id``, ``reason`` = ``flagged-<batch>``."""
    rows = verdicts[verdicts.dataset.isin(incoming) & (verdicts.verdict != "quarantined")]
    parts = [top_flagged(group, k).assign(reason=f"flagged-{batch}")[["image_id", "reason"]]
             for batch, group in rows.groupby("batch", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"image_id": [], "reason": []})


def maps_table(chosen: pd.DataFrame, labels: np.ndarray, maps: dict[str, np.ndarray], preds: np.ndarray) -> pa.Table:
    """One row per (image, method): the map as float16 ``fixed_size_list`` of H·W values."""
    rows = {k: [] for k in MAPS_SCHEMA_FIELDS}
    for method, m in maps.items():
        n, h, w = m.shape
        rows["image_id"] += chosen.image_id.tolist()
        rows["reason"] += chosen.reason.tolist()
        rows["method"] += [method] * n
        rows["pred"] += preds.astype(int).tolist()
        rows["label"] += labels.astype(int).tolist()
        rows["height"] += [h] * n
        rows["width"] += [w] * n
        rows["map"].append(m.reshape(n, -1).astype(np.float16))
    flat = np.concatenate(rows.pop("map"))
    table = pa.table(rows)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), flat.shape[1])
    return table.append_column("map", values)
