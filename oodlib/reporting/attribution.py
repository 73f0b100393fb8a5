"""PNG grids of relevance maps (:mod:`oodlib.attribution` output); matplotlib (Agg) is imported
inside the plotting function."""
from __future__ import annotations

from pathlib import Path

import numpy as np


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
