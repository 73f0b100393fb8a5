"""Failure detection, what a person looks at: risk–coverage curves of every confidence score on one
failure source (the curves: :func:`oodlib.metrics.rc_curve`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_risk_coverage(
    curves: dict[str, dict[str, np.ndarray]], path: str | Path, title: str = "", accuracy: float | None = None,
    dashed: tuple[str, ...] = (),
) -> Path:
    """Selective risk (left, AURC = its area) and generalized risk (right, AUGRC) vs coverage, one
    line per method ({method: :func:`~oodlib.metrics.rc_curve` dict}); the legend lists the
    methods best AURC first with AURC/AUGRC ×1000. With ``accuracy`` the optimal curves (all
    failures rejected first) are drawn in black. ``dashed``: methods drawn dashed (e.g. the
    error detectors, next to the solid logit baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def area(cov: np.ndarray, risk: np.ndarray) -> float:
        return float(np.sum((cov[:-1] - cov[1:]) * (risk[:-1] + risk[1:]) / 2))

    areas = {m: (area(c["coverage"], c["selective_risk"]), area(c["coverage"], c["generalized_risk"])) for m, c in curves.items()}
    # a method's colour and line style depend on its place in ``curves`` only (the same in every
    # source's figure): ten distinct colours per line style, solid and dashed families apart
    solid, broken = [m for m in curves if m not in dashed], [m for m in curves if m in dashed]
    palette = plt.get_cmap("tab10").colors
    styles = {m: dict(color=palette[i % 10], ls=("-", "-.")[i // 10 % 2]) for i, m in enumerate(solid)}
    styles.update({m: dict(color=palette[i % 10], ls=("--", ":")[i // 10 % 2]) for i, m in enumerate(broken)})
    order = sorted(curves, key=lambda m: areas[m][0])
    fig, (ax_s, ax_g) = plt.subplots(1, 2, figsize=(13, 5.2))
    for m in order:
        c = curves[m]
        style = dict(lw=1.6, **styles[m])
        label = f"{m}  ({1000 * areas[m][0]:.1f} / {1000 * areas[m][1]:.1f})"
        ax_s.plot(c["coverage"], c["selective_risk"], label=label, **style)
        ax_g.plot(c["coverage"], c["generalized_risk"], **style)
    if accuracy is not None:
        cov = np.linspace(1e-3, 1, 400)
        ax_s.plot(cov, np.maximum(0.0, 1.0 - accuracy / cov), color="k", ls=(0, (1, 1)), lw=1.4, label="optimal")
        ax_g.plot(cov, np.maximum(0.0, cov - accuracy), color="k", ls=(0, (1, 1)), lw=1.4)
    ax_s.set(xlabel="coverage (share of predictions accepted)", ylabel="selective risk (errors / accepted)",
             title="risk–coverage (AURC)", xlim=(0, 1))
    ax_g.set(xlabel="coverage (share of predictions accepted)", ylabel="generalized risk (accepted errors / all)",
             title="generalized risk–coverage (AUGRC)", xlim=(0, 1))
    for ax in (ax_s, ax_g):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.legend(*ax_s.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=9,
               title="method (AURC / AUGRC ×1000)", title_fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
