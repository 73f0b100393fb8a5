"""The nightly verdict as one self-contained HTML file (issue #15).

:func:`render_report` fills ``templates/report.html.j2`` (Jinja2, autoescaped) with a context dict
and writes **one file** that needs nothing else: CSS inline, every picture a PNG ``data:`` URI, no
script, and a Content-Security-Policy (``default-src 'none'; img-src data:; style-src
'unsafe-inline'``) that makes the browser refuse — and report on its console — anything that is
not in the file. The pictures come from the helpers below (all from arrays; matplotlib, Agg,
imported inside the functions): :func:`thumbnail_png`, :func:`heatmap_png`, :func:`trend_png`.
Rates and metrics come in as fractions and are shown in percent, the headers say so.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"


# --- pictures from arrays ----------------------------------------------------------------------


def data_uri(png: bytes) -> str:
    """PNG bytes → ``data:image/png;base64,…``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.asarray(a, np.float64) * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):  # C×H×W → H×W×C
        a = a.transpose(1, 2, 0)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def thumbnail_png(image, max_px: int = 96) -> bytes:
    """A small PNG of one image (H×W grey or H×W×3 RGB; uint8, or floats in [0, 1]): enlarged by
    the largest whole factor that keeps the longer side ≤ ``max_px`` (nearest neighbour, so the
    pixels stay sharp), or shrunk to ``max_px`` (Lanczos) when it is larger."""
    from PIL import Image

    pil = Image.fromarray(_uint8(image))
    side = max(pil.size)
    if side <= max_px:
        f = max(1, max_px // side)
        pil = pil.resize((pil.width * f, pil.height * f), Image.NEAREST)
    else:
        pil.thumbnail((max_px, max_px), Image.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure_png(fig, dpi: int) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def heatmap_png(relevance, image=None, size_in: tuple[float, float] = (1.75, 1.3), dpi: int = 100) -> bytes:
    """A small PNG of a relevance map (H×W) with a colour bar: seismic, symmetric ±max|R| (red
    positive, blue negative, white 0, as :func:`oodlib.reporting.attribution.render_grid`); with
    ``image`` (H×W) a thin outline of it is drawn on top. 175×130 px by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(relevance, np.float64)
    m = m.mean(-1) if m.ndim == 3 else m
    lim = float(np.abs(m).max()) or 1.0
    fig, ax = plt.subplots(figsize=size_in)
    im = ax.imshow(m, cmap="seismic", vmin=-lim, vmax=lim, interpolation="nearest")
    if image is not None:
        g = _uint8(image).astype(np.float64)
        g = g.mean(-1) if g.ndim == 3 else g
        if g.shape == m.shape and g.max() > g.min():
            ax.contour(g, levels=[(g.max() + g.min()) / 2], colors="#333333", linewidths=0.6, origin="upper")
    ax.set_axis_off()
    bar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04, ticks=[-lim, 0, lim])
    bar.ax.set_yticklabels([f"{-lim:.2g}", "0", f"{lim:.2g}"])
    bar.ax.tick_params(labelsize=6.5, length=2, pad=1)
    bar.outline.set_linewidth(0.4)
    fig.subplots_adjust(left=0.02, right=0.76, top=0.97, bottom=0.03)  # room for "-0.0079"
    return _figure_png(fig, dpi)


def trend_png(batches: pd.DataFrame, expected: tuple[float, float, float] | None = None, margin: float | None = None,
              alpha: float | None = None, drift_columns: tuple[str, ...] = (), fired: list[bool] | None = None,
              dpi: int = 100) -> bytes:
    """The flag rate per batch over the nights (percent, Wilson error bars) and, below it, the
    drift p-values (log scale).

    ``batches``: rows oldest first with ``batch``, ``rate``, ``lo``, ``hi`` (fractions) and the
    ``drift_columns``; ``expected``: (rate, lo, hi) of the ID flag rate, drawn as a band with the
    alert line at hi + ``margin``; ``alpha``: the drift test level (divided by the number of
    drift columns, as :mod:`oodlib.verdicts.alerts` does); ``fired``: per batch, drawn red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drift_columns = tuple(c for c in drift_columns if c in batches.columns)
    x = np.arange(len(batches))
    labels = [str(b) for b in batches["batch"]]
    rate, lo, hi = (100 * batches[c].to_numpy(np.float64) for c in ("rate", "lo", "hi"))
    panels = 2 if drift_columns else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.3 + 1.9 * (panels - 1)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [1.8, 1][:panels]})
    ax = axes[0, 0]
    if expected is not None:
        e, e_lo, e_hi = (100 * v for v in expected)
        ax.axhspan(e_lo, e_hi, color="#2e7d32", alpha=0.12, lw=0, label=f"expected ID rate {e:.1f}% [{e_lo:.1f}, {e_hi:.1f}]")
        ax.axhline(e, color="#2e7d32", lw=1, ls="--")
        if margin is not None:
            ax.axhline(e_hi + 100 * margin, color="#c62828", lw=1, ls=":", label="alert when the lower bound is above this")
    red = np.asarray(fired if fired is not None else [False] * len(x), bool)
    ax.plot(x, rate, color="#1f4e79", lw=1.5, zorder=2)
    for mask, colour, name in ((~red, "#1f4e79", "flag rate [Wilson 95%]"), (red, "#c62828", "alert")):
        if mask.any():
            ax.errorbar(x[mask], rate[mask], yerr=[rate[mask] - lo[mask], hi[mask] - rate[mask]], fmt="o", ms=6,
                        color=colour, ecolor=colour, capsize=4, lw=1.3, zorder=3, label=name)
    for xi, r in zip(x, rate):
        ax.annotate(f"{r:.1f}%", (xi, r), textcoords="offset points", xytext=(8, 4), fontsize=8, color="#333333")
    ax.set_ylabel("flagged (%)")
    ax.set_ylim(0, max(5.0, float(np.nanmax(np.r_[hi, 0])) * 1.15, (100 * (expected[2] + (margin or 0)) * 1.3) if expected else 0))
    ax.legend(fontsize=7.5, loc="upper left", frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title("flag rate per incoming batch", fontsize=10, loc="left")
    if drift_columns:
        ax2 = axes[1, 0]
        for c, marker in zip(drift_columns, "os^dv"):
            p = np.clip(batches[c].to_numpy(np.float64), 1e-300, 1)  # a p-value of exactly 0 cannot be drawn on a log axis
            ax2.plot(x, p, marker=marker, lw=1.2, label=c)
        if alpha is not None:
            ax2.axhline(alpha / len(drift_columns), color="#c62828", lw=1, ls=":", label="drift alert below this")
        ax2.set_yscale("log")
        ax2.set_ylim(top=1.5)
        ax2.set_ylabel("p-value")
        ax2.legend(fontsize=7.5, loc="lower left", frameon=False, ncol=3)
        ax2.grid(alpha=0.3, which="both")
        ax2.set_title("drift tests vs ID-val", fontsize=10, loc="left")
    axes[-1, 0].set_xticks(x, labels, fontsize=8)
    axes[-1, 0].set_xlim(-0.5, len(x) - 0.5)
    fig.tight_layout()
    return _figure_png(fig, dpi)


# --- tables ------------------------------------------------------------------------------------


def ood_results_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The ``task == "ood"`` rows of a long metrics table as one row per (OOD set, method), one
    column per metric (fractions), the OOD sets in their order and ``avg`` last."""
    rows = metrics[metrics.task == "ood"]
    wide = rows.pivot_table(index=["dataset", "method"], columns="metric", values="value", sort=False).reset_index()
    wide.columns.name = None
    order = {d: (d == "avg", i) for i, d in enumerate(rows.dataset.drop_duplicates())}
    return wide.sort_values("dataset", key=lambda s: s.map(order), kind="stable").rename(columns={"dataset": "OOD set"}).reset_index(drop=True)


def error_results_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The wrong-prediction rows (``task == "error"``, datasets val/test) as one row per method,
    columns ``<split> <metric>`` (fractions)."""
    rows = metrics[(metrics.task == "error") & metrics.dataset.isin(["val", "test"])]
    wide = rows.pivot_table(index="method", columns=["dataset", "metric"], values="value", sort=False)
    wide.columns = [f"{d} {m}" for d, m in wide.columns]
    return wide.reset_index()


def _is_percent(name: str, series: pd.Series) -> bool:
    return pd.api.types.is_float_dtype(series) and not str(name).startswith("threshold")


def table(frame: pd.DataFrame | None, percent: list[str] | None = None, digits: int = 2) -> dict | None:
    """A DataFrame as ``{"headers", "rows", "numeric"}`` for the template. ``percent``: the
    columns shown ×100 with " (%)" in their header (default: every float column except those
    whose name starts with ``threshold``); other floats print with 4 significant digits."""
    if frame is None or len(frame) == 0:
        return None
    frame = frame.reset_index(drop=True)
    cols = [str(c) for c in frame.columns]
    pct = {str(c) for c in frame.columns if _is_percent(c, frame[c])} if percent is None else set(percent)
    headers = [f"{c} (%)" if c in pct else c for c in cols]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in frame.columns]
    rows = []
    for rec in frame.itertuples(index=False):
        row = []
        for c, v in zip(cols, rec):
            if isinstance(v, (float, np.floating)):
                row.append("–" if math.isnan(v) else f"{100 * v:.{digits}f}" if c in pct else f"{v:.4g}")
            else:
                row.append(str(v))
        rows.append(row)
    return {"headers": headers, "rows": rows, "numeric": numeric}


# --- the report --------------------------------------------------------------------------------


def _plain(obj):
    """A dataclass (or anything with ``to_dict``) → dict; dicts and None pass through."""
    if obj is None or isinstance(obj, dict):
        return obj
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj.to_dict()


def _pct(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _num(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _flagged_cards(items: list[dict], thumb_px: int) -> list[dict]:
    cards = []
    for it in items:
        reasons = it.get("why", it.get("reasons", ""))
        reasons = [r for r in reasons.split("; ") if r] if isinstance(reasons, str) else list(reasons)
        image, rel = it.get("image"), it.get("relevance")
        cards.append({
            "image_id": str(it["image_id"]), "score": _num(it.get("score")), "risk": _num(it.get("risk")),
            "verdict": it.get("verdict", ""), "reasons": reasons, "pred": it.get("pred"),
            "thumb": data_uri(thumbnail_png(image, thumb_px)) if image is not None else None,
            "heatmap": data_uri(heatmap_png(rel, image)) if rel is not None else None,
        })
    return cards


def build_view(context: dict, thumb_px: int = 96) -> dict:
    """The template's variables from a report context (see :func:`render_report`)."""
    decisions = [_plain(d) for d in context.get("decisions", [])]
    ood = _plain(context.get("ood_threshold"))
    risk = _plain(context.get("risk_threshold"))
    batches = context.get("batches")
    drift_cols = tuple(context.get("drift_columns", () if batches is None else [c for c in batches.columns if c.endswith("_p")]))
    expected = context.get("expected") or ((ood["id_flag_rate"], ood["id_flag_rate_lo"], ood["id_flag_rate_hi"]) if ood else None)
    by_batch = {d["batch"]: d for d in decisions}
    rows, trend = [], None
    if batches is not None and len(batches):
        batches = batches.reset_index(drop=True)
        for r in batches.to_dict("records"):
            d = by_batch.get(str(r["batch"]), {})
            rows.append({"batch": str(r["batch"]), "n": int(r.get("n", 0)), "k": int(r.get("k", 0)), "rate": _pct(r["rate"]),
                         "ci": f"[{_pct(r['lo'])}, {_pct(r['hi'])}]", "drift": [_num(r.get(c)) for c in drift_cols],
                         "fire": d.get("fire"), "reason": d.get("reason", "")})
        fired = [bool(by_batch.get(str(b), {}).get("fire")) for b in batches["batch"]]
        margin = context.get("margin", decisions[-1]["margin"] if decisions else None)
        alpha = context.get("alpha", decisions[-1]["alpha"] if decisions else None)
        trend = data_uri(trend_png(batches, expected, margin, alpha, drift_cols, fired))
    quarantine = context.get("quarantine") or {}
    if isinstance(quarantine, pd.DataFrame):
        quarantine = dict(zip(quarantine.iloc[:, 0].astype(str), quarantine.iloc[:, 1]))
    flagged = [{"batch": str(b), "cards": _flagged_cards(items, thumb_px),
                "k": next((r["k"] for r in rows if r["batch"] == str(b)), None)}
               for b, items in (context.get("flagged") or {}).items()]
    latest = decisions[-1] if decisions else None
    return {
        "title": context.get("title", "Nightly OOD verdict"), "run_id": context.get("run_id", ""),
        "date": context.get("date", ""), "model": context.get("model", ""), "experiment": context.get("experiment", ""),
        "counts": {k: f"{v:,}" if isinstance(v, (int, np.integer)) else str(v) for k, v in (context.get("counts") or {}).items()},
        "primary": _plain(context.get("primary")), "latest": latest, "any_fire": any(d["fire"] for d in decisions),
        "ood": ood and {**ood, "t": _num(ood["threshold"]), "t_ci": f"[{_num(ood['threshold_lo'])}, {_num(ood['threshold_hi'])}]",
                        "tpr": _pct(ood["target_tpr"], 0), "rate": _pct(ood["id_flag_rate"]),
                        "rate_ci": f"[{_pct(ood['id_flag_rate_lo'])}, {_pct(ood['id_flag_rate_hi'])}]"},
        "risk": risk and {**risk, "t": _num(risk["threshold"]), "t_ci": f"[{_num(risk['threshold_lo'])}, {_num(risk['threshold_hi'])}]",
                          "rw": _pct(risk["recall_wrong"]), "rw_ci": f"[{_pct(risk['recall_wrong_lo'])}, {_pct(risk['recall_wrong_hi'])}]",
                          "rc": _pct(risk["recall_correct"]), "rate": _pct(risk["flag_rate"])},
        "expected": expected and {"rate": _pct(expected[0]), "ci": f"[{_pct(expected[1])}, {_pct(expected[2])}]",
                                  "source": context.get("expected_source", "")},
        "batch_rows": rows, "drift_columns": drift_cols, "trend": trend, "flagged": flagged,
        "ood_table": table(context.get("ood_table")), "error_table": table(context.get("error_table")),
        "quarantine": {str(k): int(v) for k, v in quarantine.items()}, "notes": list(context.get("notes", [])),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def render_report(context: dict, path: str | Path, thumb_px: int = 96) -> Path:
    """Write the self-contained HTML report of one nightly run to ``path``; returns the path.

    ``context`` (every key optional unless said):

    * ``title``, ``run_id``, ``date``, ``model``, ``experiment``: strings for the header;
    * ``counts``: {label: number} (e.g. images scored, incoming, flagged, quarantined);
    * ``primary``: a :class:`~oodlib.verdicts.PrimaryChoice` (or its dict);
    * ``ood_threshold`` / ``risk_threshold``: :class:`~oodlib.verdicts.OODThreshold` /
      :class:`~oodlib.verdicts.RiskThreshold` (or dicts); the OOD one gives the expected ID rate
      unless ``expected`` = (rate, lo, hi) says it (e.g. the measured ID test rate of any flag);
    * ``batches``: DataFrame, one row per incoming batch, oldest first: ``batch``, ``n``, ``k``,
      ``rate``, ``lo``, ``hi`` (fractions, :func:`~oodlib.verdicts.flag_rate_table`) and drift
      p-value columns (``drift_columns``; default: the columns ending in ``_p``);
    * ``decisions``: one :class:`~oodlib.verdicts.AlertDecision` (or its dict) per batch, oldest
      first as :func:`~oodlib.verdicts.alert_history` returns them; the last is the headline;
      ``margin``/``alpha`` (the trend plot's alert lines) default to its own;
    * ``flagged``: {batch: [{``image_id``, ``image`` (H×W or H×W×3), ``score``, ``risk``,
      ``why`` (or ``reasons``: str joined by "; " or list), ``verdict``, ``pred``, ``relevance`` (H×W or None)}]} — the
      top-k flagged images of each batch (:func:`~oodlib.verdicts.top_flagged`);
    * ``ood_table`` / ``error_table``: DataFrames of fractions (:func:`ood_results_frame`,
      :func:`error_results_frame`), shown in percent (see :func:`table`);
    * ``quarantine``: {reason: count} or a two-column DataFrame; ``notes``: extra sentences.
    """
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template(TEMPLATE).render(**build_view(context, thumb_px))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
