"""Localization and perturbation metrics for relevance maps (spec ``metrics.md``, explanations).

Maps are B×H×W (channel-summed relevance), masks B×H×W bool (object pixels). Per-image values
come back as NumPy arrays; :func:`localization_table` averages them into one row per method, with
the columns of RAP Table 1 / AE Tables 1–3. Lower is better for every outside–inside ratio.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def pointing_game(maps, masks, tolerance: int = 0) -> dict:
    """Hit if the arg-max pixel lies in the mask dilated by a disk of radius ``tolerance`` px
    (TorchRay uses 15). Images with an empty mask are skipped and counted in ``skipped``.
    Returns {hits, misses, skipped, accuracy = hits/(hits+misses), hit (per image, NaN if skipped)}."""
    maps, masks = _np(maps), _np(masks).astype(bool)
    b = maps.shape[0]
    m = torch.from_numpy(masks[:, None].astype(np.float32))
    if tolerance > 0:
        r = np.arange(-tolerance, tolerance + 1)
        disk = torch.from_numpy(((r[:, None] ** 2 + r[None] ** 2) <= tolerance**2).astype(np.float32))
        m = F.conv2d(m, disk[None, None], padding=tolerance) > 0
    flat = maps.reshape(b, -1).argmax(1)
    hit = m.reshape(b, -1).numpy()[np.arange(b), flat].astype(float)
    empty = ~masks.reshape(b, -1).any(1)
    hit[empty] = np.nan
    hits, misses = int(np.nansum(hit)), int((hit == 0).sum())
    return {
        "hits": hits,
        "misses": misses,
        "skipped": int(empty.sum()),
        "accuracy": hits / (hits + misses) if hits + misses else float("nan"),
        "hit": hit,
    }


def positive_ratio(maps) -> np.ndarray:
    """Fraction of pixels with relevance > 0, per image."""
    maps = _np(maps)
    return (maps > 0).reshape(len(maps), -1).mean(1)


def _mean_where(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    return (v * m).reshape(len(v), -1).sum(1) / np.maximum(m.reshape(len(m), -1).sum(1), 1)


def outside_inside_ratio(maps, masks, variant: str = "signed") -> np.ndarray:
    """Outside–inside relevance ratio per image (lower is better).

    * ``signed`` (RAP eq. 11): (mean R⁺ out + mean |R⁻| in) / (mean R⁺ in + mean |R⁻| out);
    * ``pos``: mean R⁺ out / mean R⁺ in (negative relevance dropped);
    * ``normalized`` (AE eq. 14): R mapped to [0, 1] per image, mean out / mean in.
    Means are over all pixels of the region (|P_in|, |P_out|). NaN where the denominator is 0.
    """
    maps, inside = _np(maps).astype(np.float64), _np(masks).astype(bool)
    outside = ~inside
    if variant == "normalized":
        lo = maps.min((1, 2), keepdims=True)
        span = maps.max((1, 2), keepdims=True) - lo
        nmap = (maps - lo) / np.where(span > 0, span, 1.0)
        num, den = _mean_where(nmap, outside), _mean_where(nmap, inside)
    else:
        pos, neg = np.clip(maps, 0, None), -np.clip(maps, None, 0)
        num, den = _mean_where(pos, outside), _mean_where(pos, inside)
        if variant == "signed":
            num, den = num + _mean_where(neg, inside), den + _mean_where(neg, outside)
        elif variant != "pos":
            raise ValueError(f"unknown variant {variant!r}; use signed, pos or normalized")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def segmentation(maps, masks, threshold: str = "pos") -> dict:
    """Segment by thresholding (RAP §Objectness): ``pos`` keeps R⁺ and thresholds at its mean,
    ``all`` thresholds R at 0. Per image: pixel accuracy and mIoU = mean IoU of foreground and
    background. Returns {pixel_accuracy, miou} arrays."""
    maps, gt = _np(maps), _np(masks).astype(bool)
    if threshold == "pos":
        pos = np.clip(maps, 0, None)
        pred = pos > pos.mean((1, 2), keepdims=True)
    elif threshold == "all":
        pred = maps > 0
    else:
        raise ValueError(f"unknown threshold {threshold!r}; use pos or all")
    acc = (pred == gt).reshape(len(gt), -1).mean(1)
    ious = []
    for p, g in ((pred, gt), (~pred, ~gt)):
        inter = (p & g).reshape(len(g), -1).sum(1)
        union = (p | g).reshape(len(g), -1).sum(1)
        ious.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    return {"pixel_accuracy": acc, "miou": (ious[0] + ious[1]) / 2}


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a batch (B×C×H×W), kernel radius 3σ, reflect padding."""
    r = max(1, round(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _rank_masks(maps: torch.Tensor, counts: list[int], descending: bool) -> torch.Tensor:
    """S×B×1×H×W masks of the top (``descending``) or bottom ``counts[s]`` pixels of each map."""
    b, h, w = maps.shape
    order = maps.reshape(b, -1).argsort(1, descending=descending)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=maps.device).expand(b, -1))
    k = torch.as_tensor(counts, device=maps.device)
    return (rank[None] < k[:, None, None]).view(len(counts), b, 1, h, w)


@torch.no_grad()
def _curve(model, composites: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean target probability for each step of S×B×C×H×W composites."""
    s, b = composites.shape[:2]
    probs = torch.softmax(model(composites.flatten(0, 1)), 1).view(s, b, -1)
    acc = (probs.argmax(2) == target[None]).float().mean(1)
    return _np(acc), _np(probs.gather(2, target[None, :, None].expand(s, -1, 1))[..., 0].mean(1))


def morf_insertion(model, x: torch.Tensor, maps, target: torch.Tensor, fractions=None, sigma: float = 2.0) -> dict:
    """MoRF insertion (AE §5.4): the top-p relevance pixels of ``x`` (all channels) pasted into a
    Gaussian-blurred copy, p = 1 … 20 % by default. Returns {fractions, accuracy, probability,
    accuracy_area, probability_area}; areas are trapezoid means over p (curve height averaged)."""
    fractions = np.arange(1, 21) / 100.0 if fractions is None else np.asarray(fractions, float)
    maps = torch.as_tensor(_np(maps), device=x.device, dtype=x.dtype)
    counts = [round(f * maps.shape[1] * maps.shape[2]) for f in fractions]
    keep = _rank_masks(maps, counts, descending=True)
    blurred = gaussian_blur(x, sigma)
    acc, prob = _curve(model, torch.where(keep, x[None], blurred[None]), target)
    span = fractions[-1] - fractions[0] if len(fractions) > 1 else 1.0
    area = (lambda c: float(np.trapezoid(c, fractions) / span) if len(fractions) > 1 else float(c[0]))
    return {"fractions": fractions, "accuracy": acc, "probability": prob,
            "accuracy_area": area(acc), "probability_area": area(prob)}


def lerf_deletion(model, x: torch.Tensor, maps, target: torch.Tensor, steps: int = 40, pixels_per_step=None, fill: float = 0.0) -> dict:
    """LeRF deletion (RAP Fig. 7): the least relevant pixels set to ``fill`` (0 = the mean after
    normalization) in ``steps`` steps of ``pixels_per_step`` (default 100 px per step at 224²,
    scaled by image area). Returns {pixels, accuracy, probability} with step 0 = unperturbed."""
    maps = torch.as_tensor(_np(maps), device=x.device, dtype=x.dtype)
    hw = maps.shape[1] * maps.shape[2]
    per = pixels_per_step or max(1, round(100 * hw / 224**2))
    counts = [min(hw, per * s) for s in range(steps + 1)]
    drop = _rank_masks(maps, counts, descending=False)
    acc, prob = _curve(model, torch.where(drop, torch.full_like(x, fill)[None], x[None]), target)
    return {"pixels": np.asarray(counts), "accuracy": acc, "probability": prob}


def evaluate_maps(maps, masks, box_masks=None, tolerance: int = 0) -> dict[str, float]:
    """Mean of every map metric over the images: pointing game (mask, and box when given),
    positive ratio, outside–inside ratios (signed / pos / normalized, against the box when given as
    in RAP, else the mask), segmentation pixel accuracy and mIoU (POS and ALL) against the mask."""
    region = masks if box_masks is None else box_masks
    out = {"pointing_game": pointing_game(maps, masks, tolerance)["accuracy"]}
    if box_masks is not None:
        out["pointing_game_box"] = pointing_game(maps, box_masks, tolerance)["accuracy"]
    out["positive_ratio"] = float(positive_ratio(maps).mean())
    for v in ("signed", "pos", "normalized"):
        out[f"oi_{v}"] = float(np.nanmean(outside_inside_ratio(maps, region, v)))
    for t in ("pos", "all"):
        seg = segmentation(maps, masks, t)
        out[f"pixel_acc_{t}"] = float(seg["pixel_accuracy"].mean())
        out[f"miou_{t}"] = float(seg["miou"].mean())
    return out


def localization_table(maps_by_method: dict, masks, box_masks=None, tolerance: int = 0, morf: dict | None = None):
    """pandas DataFrame, one row per method (index ``method``), columns from :func:`evaluate_maps`
    plus ``morf_acc_area``/``morf_prob_area`` when ``morf`` = {"model", "x", "target"} is given.
    Pass AE ablation maps under names like ``ae[C+Psi]`` to get the ablation table."""
    import pandas as pd

    rows = {}
    for name, maps in maps_by_method.items():
        row = evaluate_maps(maps, masks, box_masks, tolerance)
        if morf is not None:
            res = morf_insertion(morf["model"], morf["x"], maps, morf["target"])
            row["morf_acc_area"], row["morf_prob_area"] = res["accuracy_area"], res["probability_area"]
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")
