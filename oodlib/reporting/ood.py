"""OOD plots: ROC curves and score histograms per detector, as PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from oodlib.evaluation import score_columns


def plot_roc_and_histograms(scores: pd.DataFrame, id_dataset: str, ood_datasets: list[str], out_dir: Path) -> list[Path]:
    """Per detector: ROC curves (ID positive, one curve per OOD set) and score histograms, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    id_rows = scores[(scores.dataset == id_dataset) & (scores.split == "test")]
    paths = []
    for column in score_columns(scores):
        method = column.removeprefix("score_")
        # a fixed layout: tight_layout would draw the figure once more just to measure it
        fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"left": 0.06, "right": 0.985, "bottom": 0.12,
                                                                                     "top": 0.92, "wspace": 0.2})
        s_id = id_rows[column].to_numpy()
        every = scores[column].to_numpy(np.float64)
        bins = np.histogram_bin_edges(every[np.isfinite(every)], bins=50)  # null where a detector's EMBED column was not computed
        # step-filled: one polygon per set instead of a patch per bar (the drawing cost of a figure)
        ax_hist.hist(s_id, bins=bins, alpha=0.55, density=True, histtype="stepfilled", label=f"{id_dataset} (ID)")
        for ood in ood_datasets:
            s_ood = scores.loc[scores.dataset == ood, column].to_numpy()
            fpr, tpr, _ = roc_curve(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
            ax_roc.plot(fpr, tpr, label=ood)
            ax_hist.hist(s_ood, bins=bins, alpha=0.45, density=True, histtype="stepfilled", label=ood)
        ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax_roc.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=f"ROC — {method}")
        ax_hist.set(xlabel=f"{method} score (higher = more ID)", ylabel="density", title="score histograms")
        ax_roc.legend(fontsize=8)
        ax_hist.legend(fontsize=8)
        path = out_dir / f"{method}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
