"""Wrong-prediction risk, what a person looks at: seed Figure 4 (AUROC of the LCR vs the number of
mutants). The curves come from :func:`oodlib.errors.auroc_vs_mutants`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_auroc_vs_mutants(curves: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Write the AUROC-vs-mutants curves ({label: :func:`~oodlib.errors.auroc_vs_mutants` frame})
    as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, df in curves.items():
        ax.plot(df["mutants"], df["auroc"], marker="o", ms=3, label=label)
    ax.set_xlabel("number of mutants")
    ax.set_ylabel("AUROC (wrong positive)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
