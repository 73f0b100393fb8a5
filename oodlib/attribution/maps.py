"""Relevance maps in batches, for several methods at once, and the localization benchmark
(RAP Table 1, AE Tables 1–3 and the AE ablation) on the embedded set or ground truth on disk."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from oodlib.attribution import AE_ABLATION, explain
from oodlib.attribution.localization import lerf_deletion, localization_table


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


def localization_benchmark(
    model, n: int, methods: list[str], device: torch.device, data: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """Metrics per method, plus LeRF deletion curves, with the maps of each image's labelled class
    (the pointing game's protocol). ``data``: ground truth on disk — ``list_file``, ``masks_dir`` or
    ``voc_dir``, ``tolerance`` (:func:`oodlib.data.localization.localization_from_files`); None = the
    embedded digits-on-photos set."""
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


def display_images(x: np.ndarray, pre) -> np.ndarray:
    """Normalized inputs N×C×H×W → displayable N×H×W (grey) or N×H×W×3 in [0, 1]."""
    mean = np.asarray(pre.mean, np.float32)[None, :, None, None]
    std = np.asarray(pre.std, np.float32)[None, :, None, None]
    img = np.clip(x * std + mean, 0, 1)
    return img[:, 0] if img.shape[1] == 1 else img.transpose(0, 2, 3, 1)
