"""Metric trends over runs, as a PNG (what ``oodlib compare`` draws)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def plot_trend(compared: pd.DataFrame, last: int, path: Path, direction: dict[str, int], title: str) -> Path:
    """Avg auroc and fpr95 per detector over the shown runs (oldest → newest), as a PNG.

    ``compared``: rows ``order`` (0 = newest), ``start_time``, ``run_id``, ``method``, ``set``,
    ``metric``, ``value``; ``direction``: +1 when higher is better, −1 when lower is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = compared[(compared["set"] == "avg") & (compared["order"] < last)]
    orders = sorted(avg["order"].unique(), reverse=True)  # oldest first
    labels = [f"{avg[avg['order'] == o]['start_time'].iloc[0]:%m-%d %H:%M}\n{avg[avg['order'] == o]['run_id'].iloc[0][:8]}" for o in orders]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(orders) + 4), 4), squeeze=False)
    for ax, metric in zip(axes[0], ["auroc", "fpr95"]):
        for method in sorted(avg["method"].unique()):
            s = avg[(avg["method"] == method) & (avg["metric"] == metric)].set_index("order")["value"]
            ax.plot(range(len(orders)), [s.get(o, np.nan) for o in orders], marker="o", label=method)
        ax.set_xticks(range(len(orders)), labels, fontsize=7)
        ax.set_title(f"avg {metric} ({'higher' if direction[metric] > 0 else 'lower'} is better)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
