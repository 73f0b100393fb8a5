"""Which images to explain, and PNG grids of their relevance maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def select_images(
    image_ids,
    pred,
    label,
    confidence,
    ood_score=None,
    counts: dict | None = None,
    seed: int = 0,
):
    """Pick images to explain; returns a DataFrame (``image_id``, ``reason``), no id twice.

    Inputs are aligned arrays: ``label`` −1 marks OOD; ``confidence`` = ID-confidence of the
    prediction (e.g. MSP, higher = surer); ``ood_score`` = ID-confidence of an OOD detector
    (higher = more ID; default ``confidence``). Reasons, in order, with ``counts`` (defaults 8 each):
    ``wrong`` (ID, pred ≠ label, most confident first), ``uncertain`` (ID, lowest confidence),
    ``risky_ood`` (OOD the detector finds most ID-like = highest ``ood_score``), ``random`` (seeded).
    """
    import pandas as pd

    ids, pred, label = np.asarray(image_ids), np.asarray(pred), np.asarray(label)
    conf = np.asarray(confidence, float)
    ood = conf if ood_score is None else np.asarray(ood_score, float)
    counts = {"wrong": 8, "uncertain": 8, "risky_ood": 8, "random": 8, **(counts or {})}
    is_id = label >= 0
    pools = {
        "wrong": np.flatnonzero(is_id & (pred != label))[np.argsort(-conf[is_id & (pred != label)], kind="stable")],
        "uncertain": np.flatnonzero(is_id)[np.argsort(conf[is_id], kind="stable")],
        "risky_ood": np.flatnonzero(~is_id)[np.argsort(-ood[~is_id], kind="stable")],
        "random": np.random.default_rng(seed).permutation(len(ids)),
    }
    taken: set[int] = set()
    rows = []
    for reason in ("wrong", "uncertain", "risky_ood", "random"):
        picked = [i for i in pools[reason] if i not in taken][: counts.get(reason, 0)]
        taken.update(picked)
        rows += [(ids[i], reason) for i in picked]
    return pd.DataFrame(rows, columns=["image_id", "reason"])


def render_grid(images, maps_by_method: dict, path, titles=None, dpi: int = 100) -> Path:
    """Write a PNG grid: one row per image, columns image | one map per method.

    ``images``: N×H×W (grey) or N×H×W×3 in [0, 1] or uint8; ``maps_by_method``: {name: N×H×W}.
    Maps use the seismic colormap (red positive, blue negative) with symmetric limits ±max|R| per map.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    names = list(maps_by_method)
    n, cols = len(images), 1 + len(names)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i], cmap="gray" if images[i].ndim == 2 else None)
        axes[i, 0].set_title(titles[i] if titles is not None else "image", fontsize=7)
        for j, name in enumerate(names, start=1):
            m = np.asarray(maps_by_method[name][i], np.float32)
            lim = float(np.abs(m).max()) or 1.0
            axes[i, j].imshow(m, cmap="seismic", vmin=-lim, vmax=lim)
            if i == 0:
                axes[i, j].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
