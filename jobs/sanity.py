"""Warnings about results that are probably not what the user meant: an ID accuracy at chance
(wrong weights, class count or preprocessing), metrics computed on too few images, a Grad-CAM
layer whose maps are 1×1. They do not stop the job; they are logged and kept in the summary."""
from __future__ import annotations

import logging

import pandas as pd
import torch

log = logging.getLogger("oodlib.sanity")
#: fewer images than this in a set makes its metrics noise
MIN_POSITIVES = 20


def result_warnings(metrics: pd.DataFrame, set_sizes: dict[str, int], id_dataset: str, num_classes: int) -> list[str]:
    """Warnings from the metrics table (task ``classify``) and the rows per evaluated set."""
    out = []
    acc = metrics[(metrics.task == "classify") & (metrics.dataset == id_dataset) & (metrics.metric == "acc")]
    if len(acc) and acc.value.iloc[0] <= 1.5 / num_classes:
        out.append(f"ID test accuracy {acc.value.iloc[0]:.3f} is at chance (1/{num_classes} = {1 / num_classes:.3f}): "
                   "check model.weights, model.num_classes and the preprocessing (model.preset, input_size, mean/std)")
    for name, n in sorted(set_sizes.items()):
        if n < MIN_POSITIVES:
            out.append(f"{name}: metrics computed on {n} image(s) (< {MIN_POSITIVES}); they are mostly noise")
    for w in out:
        log.warning(w)
    return out


def gradcam_map_size(model, layer: str | None = None) -> tuple[int, int]:
    """(H, W) of the Grad-CAM layer's output for one input of the model's size."""
    seen = {}

    def record(module, inputs, output) -> None:  # a hook returning None leaves the output alone
        seen["shape"] = tuple(output.shape[-2:])

    handle = model.layer(layer).register_forward_hook(record)
    try:
        with torch.no_grad():
            pre = model.preprocess
            model(torch.zeros(1, pre.channels, *pre.size, device=next(model.parameters()).device))
    finally:
        handle.remove()
    return seen.get("shape", (0, 0))


def gradcam_warning(model) -> str | None:
    """A warning when Grad-CAM's maps would be a single pixel (an input too small for the network)."""
    h, w = gradcam_map_size(model)
    if h * w <= 1:
        msg = (f"Grad-CAM: layer {model.default_layer!r} is {h}×{w} at input {model.preprocess.size}: every map is one "
               "constant; use a larger input (model.input_size) or leave gradcam out of explain.methods")
        log.warning(msg)
        return msg
    return None
