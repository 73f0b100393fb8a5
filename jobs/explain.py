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

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from jobs import storage
from oodlib.attribution import AE_ABLATION, explain
from oodlib.attribution.localization import lerf_deletion, localization_table
from oodlib.attribution.report import render_grid, select_images
from oodlib.data.decode import decode_batch
from oodlib.device import resolve_device

STAGE_VERSION = 2  # 2: localization maps explain the labelled class
MAPS_SCHEMA_FIELDS = ["image_id", "reason", "method", "pred", "label", "height", "width", "map"]


def method_options(method: str) -> tuple[str, dict]:
    """``ae[C+Psi]`` → ("ae", {"terms": …}); plain names pass through."""
    if method.startswith("ae[") and method.endswith("]"):
        return "ae", {"terms": AE_ABLATION[method[3:-1]]}
    return method, {}


def compute_maps(
    model, x: torch.Tensor, methods: list[str], batch_size: int = 16, target: torch.Tensor | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{method: maps N×H×W float32} for ``target`` (N,; default the predicted class), and the
    predictions (N,)."""
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    preds = []
    for i in range(0, len(x), batch_size):
        xb, tb = x[i : i + batch_size], None if target is None else target[i : i + batch_size]
        for m in methods:
            name, opts = method_options(m)
            out, logits, _ = explain(model, xb, method=name, target=tb, **opts)
            maps[m].append(out.detach().float().cpu().numpy())
        preds.append(logits.argmax(1).cpu().numpy())
    return {m: np.concatenate(v) for m, v in maps.items()}, np.concatenate(preds)


def explain_task(spec_state: dict, model_name: str, num_classes: int, images: list, paths: list, methods: list[str], localization: dict | None):
    """Runs in a Ray task: decode, compute maps, and (optionally) the localization benchmark."""
    from jobs.embed import rebuild_model

    device = resolve_device("auto")
    model = rebuild_model(model_name, num_classes, spec_state, device)
    x, reasons = decode_batch(images, paths, model.preprocess)
    maps, preds = compute_maps(model, x.to(device), methods)
    result = {"maps": maps, "pred": preds, "reasons": reasons, "inputs": x.numpy()}
    if localization is not None:
        result["localization"] = localization_benchmark(
            model, localization["n"], localization["methods"], device, localization["data"])
    return result


def localization_benchmark(
    model, n: int, methods: list[str], device: torch.device, data: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """Metrics per method, plus LeRF deletion curves, with the maps of each image's labelled class
    (the pointing game's protocol). ``data``: ground truth on disk (the fields of
    :class:`jobs.config.LocalizationDataConfig`); None = the embedded digits-on-photos set."""
    from oodlib.data.localization import build_localization, localization_from_files

    if data is None:
        loc, tolerance = build_localization(seed=0, n=n), 0
    else:
        loc = localization_from_files(data["list_file"], model.preprocess, data["masks_dir"], data["voc_dir"], limit=n)
        tolerance = data["tolerance"]
    x = torch.from_numpy(loc.inputs()).to(device)
    target = torch.as_tensor(loc.labels, device=device)
    maps, preds = compute_maps(model, x, methods, target=target)
    table = localization_table(maps, loc.masks, loc.box_masks(), tolerance, morf={"model": model, "x": x, "target": target})
    table["accuracy"] = float(np.mean(preds == loc.labels))
    lerf = {m: lerf_deletion(model, x, maps[m], target, steps=10) for m in methods if not m.startswith("ae[")}
    lerf_df = pd.DataFrame(
        [(m, i, float(a)) for m, r in lerf.items() for i, a in enumerate(r["accuracy"])], columns=["method", "step", "accuracy"]
    )
    return {"table": table.reset_index(), "lerf": lerf_df}


def select(scores: pd.DataFrame, counts: dict, seed: int) -> pd.DataFrame:
    """Images to explain from the scores table (confidence = MSP; OOD risk = the first score column)."""
    ood_col = next(c for c in scores.columns if c.startswith("score_") and c != "score_msp")
    return select_images(scores.image_id, scores.pred, scores.label, scores.score_msp, scores[ood_col], counts, seed)


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


def run_explain(
    cfg, model, model_state_ref, manifest: pa.Table, scores: pd.DataFrame, target: storage.StageDir, num_gpus: float,
) -> list[Path]:
    """Select, explain (one Ray task) and commit maps, PNG grids and localization tables.
    Returns the artifact paths to log."""
    import ray

    ex = cfg.explain
    chosen = select(scores, dict(ex.counts), ex.seed)
    rows = manifest.filter(pc.is_in(manifest.column("image_id"), pa.array(chosen.image_id.tolist())))
    order = {iid: i for i, iid in enumerate(rows.column("image_id").to_pylist())}
    rows = rows.take(pa.array([order[i] for i in chosen.image_id]))
    localization = {
        "n": ex.localization_images, "methods": ex.methods + [f"ae[{k}]" for k in AE_ABLATION],
        "data": None if ex.localization_data is None else ex.localization_data.model_dump(mode="json"),
    } if ex.localization else None
    task = ray.remote(explain_task).options(num_gpus=num_gpus, num_cpus=1)
    result = ray.get(task.remote(model_state_ref, model.name, model.num_classes, rows.column("image").to_pylist(),
                                 rows.column("path").to_pylist(), ex.methods, localization))
    labels = np.asarray(rows.column("label").to_pylist())
    artifacts = []
    with target.writing() as tmp:
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
    artifacts = sorted(target.path.glob("*.png")) + [p for p in (target.path / "localization.md",) if p.exists()]
    return artifacts


def display_images(x: np.ndarray, pre) -> np.ndarray:
    """Normalized inputs N×C×H×W → displayable N×H×W (grey) or N×H×W×3 in [0, 1]."""
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    img = np.clip(x * std + mean, 0, 1)
    return img[:, 0] if img.shape[1] == 1 else img.transpose(0, 2, 3, 1)


def localization_markdown(table: pd.DataFrame) -> str:
    cols = [c for c in table.columns if c not in ("method",)]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in table.itertuples(index=False):
        d = r._asdict()
        lines.append(f"| {d['method']} | " + " | ".join(f"{d[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
