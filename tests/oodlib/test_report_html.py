"""The self-contained HTML report: its pictures, its tables, its size, and how a browser shows it.

The browser check runs Debian's ``chromium`` headless (skipped, saying why, when it is not on
PATH) and reads the page's console from Chromium's own log: with ``--enable-logging=stderr
--v=0`` every console message the page produces (script errors, ``console.*`` calls, and the
Content-Security-Policy refusals that any external resource would cause, since the report sets a
CSP of ``default-src 'none'; img-src data:``) is printed as an ``INFO:CONSOLE`` line. A
negative control (the same report with one external image) proves the check sees them.
"""
from __future__ import annotations

import io
import re
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oodlib.reporting.html import (
    error_results_frame,
    heatmap_png,
    ood_results_frame,
    render_report,
    table,
    thumbnail_png,
    trend_png,
)
from oodlib.verdicts import (
    alert_history,
    choose_primary,
    flag_rate_table,
    image_verdicts,
    ood_threshold,
    risk_threshold,
    top_flagged,
)

DATES = ("2026-11-29", "2026-11-30", "2026-12-01")
TOP_K = 12


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def _digit_like(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    cy, cx, r = rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(6, 10)
    ring = np.exp(-((np.hypot(yy - cy, xx - cx) - r) ** 2) / 4.0)
    return np.clip(255 * ring + rng.normal(0, 8, (32, 32)), 0, 255).astype(np.uint8)


def _metrics() -> pd.DataFrame:
    rows = []
    for method, base in (("msp", 0.90), ("knn", 0.95), ("energy", 0.92)):
        for ds in ("digits-near", "photo-patches", "noise", "avg"):
            rows += [("ood", method, ds, "auroc", base), ("ood", method, ds, "fpr95", 1.1 - base), ("ood", method, ds, "aupr_in", base)]
    for method, v in (("conductance", 0.85), ("lcr", 0.80)):
        for ds in ("val", "test"):
            rows += [("error", method, ds, m, v - d) for m, d in (("auroc", 0), ("recall_correct", 0.05), ("recall_wrong", 0.06))]
    return pd.DataFrame(rows, columns=["task", "method", "dataset", "metric", "value"])


@pytest.fixture(scope="module")
def context() -> dict:
    """A synthetic nightly run: three batches with a growing share of low scores, top-k flagged
    images with relevance maps; one image id carries markup that must be escaped."""
    rng = np.random.default_rng(0)
    val = rng.normal(size=400)
    ood = ood_threshold(val, 0.95, n_boot=200)
    wrong = rng.random(400) < 0.15
    risk = risk_threshold(rng.normal(size=400) + 1.5 * wrong, wrong, n_boot=200)
    frames, flagged = [], {}
    for i, (date, share) in enumerate(zip(DATES, (0.05, 0.2, 0.45))):
        n = 120
        scores = np.where(rng.random(n) < share, rng.normal(-2.5, 1, n), rng.normal(size=n))
        risks = rng.normal(size=n) + (scores < -1.5)
        ids = [f"prod/{date}/{j:05d}" for j in range(n)]
        if i == 2:
            ids[int(np.argmin(scores))] = "prod/<script>alert(1)</script>"
        v = image_verdicts(ids, scores, ood, risks, risk, "msp", "lcr").assign(batch=date)
        frames.append(v)
        flagged[date] = [{"image_id": r.image_id, "image": _digit_like(rng), "score": r.score, "risk": r.risk,
                          "why": r.why, "verdict": r.verdict, "relevance": rng.normal(size=(32, 32))}
                         for r in top_flagged(v, TOP_K).itertuples()]
    batches = flag_rate_table(pd.concat(frames), "is_ood")
    batches["c2st_p"] = [0.6, 0.03, 0.002]
    batches["ks_p"] = [0.8, 0.01, 1e-9]
    decisions = alert_history(batches, ood.id_flag_rate, ood.id_flag_rate_hi, drift_columns=("c2st_p", "ks_p"))
    metrics = _metrics()
    return dict(
        title="Nightly OOD verdict — digits", run_id="3f9c2a71be4d4f0e", date=DATES[-1], model="digits-cnn",
        experiment="nightly", counts={"images scored": 2500, "incoming": 360, "quarantined": 2},
        primary=choose_primary(metrics), ood_threshold=ood, risk_threshold=risk, batches=batches, decisions=decisions,
        flagged=flagged, ood_table=ood_results_frame(metrics), error_table=error_results_frame(metrics),
        quarantine={"duplicate image_id": 1, "label 12 out of range [-1, 8)": 1}, notes=["synthetic context"],
    )


@pytest.fixture(scope="module")
def report(context, tmp_path_factory) -> Path:
    return render_report(context, tmp_path_factory.mktemp("report") / "report.html")


class _Refs(HTMLParser):
    """Every src/href attribute and every tag name."""

    def __init__(self):
        super().__init__()
        self.refs, self.tags, self.meta = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]
        if tag == "meta":
            self.meta.append(dict(attrs))


# --- pictures ----------------------------------------------------------------------------------


def test_thumbnail_sizes():
    assert _png_size(thumbnail_png(np.zeros((32, 32), np.uint8))) == (96, 96)  # ×3, nearest
    assert _png_size(thumbnail_png(np.zeros((32, 32), np.uint8), max_px=64)) == (64, 64)
    assert max(_png_size(thumbnail_png(np.zeros((200, 100, 3), np.uint8)))) == 96  # shrunk, aspect kept
    assert _png_size(thumbnail_png(np.random.default_rng(0).random((1, 28, 28)))) == (84, 84)  # C×H×W floats in [0, 1]


def test_heatmap_and_trend_are_pngs(context):
    png = heatmap_png(np.random.default_rng(0).normal(size=(32, 32)), np.zeros((32, 32), np.uint8))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and _png_size(png) == (175, 130)
    assert heatmap_png(np.zeros((32, 32)))[:4] == b"\x89PNG"  # an all-zero map still draws
    b = context["batches"]
    trend = trend_png(b, (0.05, 0.03, 0.07), 0.02, 0.01, ("c2st_p", "ks_p"), [False, False, True])
    assert _png_size(trend) == (900, 520)
    assert _png_size(trend_png(b[["batch", "rate", "lo", "hi"]])) == (900, 330)  # no drift panel


def test_table_shows_percent():
    t = table(pd.DataFrame({"method": ["a"], "auroc": [0.9512], "threshold": [0.5], "n": [3]}))
    assert t["headers"] == ["method", "auroc (%)", "threshold", "n"]
    assert t["rows"] == [["a", "95.12", "0.5", "3"]]
    assert t["numeric"] == [False, True, True, True]
    assert table(None) is None and table(pd.DataFrame()) is None


def test_results_frames():
    m = _metrics()
    o = ood_results_frame(m)
    assert list(o.columns[:2]) == ["OOD set", "method"] and list(o["OOD set"].unique()) == ["digits-near", "photo-patches", "noise", "avg"]
    e = error_results_frame(m)
    assert list(e.method) == ["conductance", "lcr"] and e.loc[0, "val auroc"] == 0.85 and "test recall_wrong" in e.columns


# --- the file ----------------------------------------------------------------------------------


def test_report_is_self_contained_and_small(report):
    html = report.read_text(encoding="utf-8")
    assert report.stat().st_size < 2_000_000
    p = _Refs()
    p.feed(html)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert p.refs and all(v.startswith("data:image/png;base64,") for tag, k, v in p.refs)
    csp = [m for m in p.meta if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    assert not re.search(r"url\(", html) and "@import" not in html


def test_report_content(report, context):
    html = report.read_text(encoding="utf-8")
    for text in ("3f9c2a71be4d4f0e", "digits-cnn", *DATES, "ALERT", "auroc (%)", "flag rate (%)", "Quarantine",
                 "label 12 out of range [-1, 8)", context["primary"].ood_reason):
        assert text in html, text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # escaped, not markup
    n_imgs = html.count('class="thumb"')
    assert n_imgs == sum(len(v) for v in context["flagged"].values()) == 3 * TOP_K
    assert html.count("<img") == 2 * n_imgs + 1  # thumbnails, heatmaps, the trend plot


def test_minimal_contexts(context, tmp_path):
    empty = render_report({}, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert "Nightly OOD verdict" in empty and "<img" not in empty
    only_batches = {"batches": context["batches"][["batch", "n", "k", "rate", "lo", "hi"]]}
    html = render_report(only_batches, tmp_path / "b.html").read_text(encoding="utf-8")
    assert html.count("<img") == 1 and "ALERT" not in html  # the trend plot; no decisions, no alert


# --- in a browser ------------------------------------------------------------------------------


def _chromium(html: Path, png: Path, tmp: Path) -> tuple[int, list[str]]:
    """Screenshot ``html`` with headless Chromium; (exit code, the page's console lines)."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", f"--screenshot={png}",
           "--window-size=1280,2400", html.resolve().as_uri()]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    return res.returncode, [line for line in (res.stderr + res.stdout).splitlines() if ":CONSOLE" in line]


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None and os.environ.get("OODLIB_REQUIRE_CHROMIUM") != "1",
                                    reason="chromium is not on PATH (Debian: apt-get install -y chromium); "
                                           "OODLIB_REQUIRE_CHROMIUM=1 (.ci/run) makes this a failure")


@needs_chromium
def test_report_in_chromium(report, tmp_path):
    png = tmp_path / "report.png"
    code, console = _chromium(report, png, tmp_path)
    assert code == 0 and console == []
    im = Image.open(png).convert("RGB")
    assert im.size == (1280, 2400)
    grey = np.asarray(im.convert("L"), np.int16)
    background = np.bincount(grey.ravel()).argmax()
    assert np.mean(np.abs(grey - background) > 16) > 0.05  # not blank: text, tables, pictures
    rgb = np.asarray(im, np.int16)
    reds = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert reds.sum() > 200  # the ALERT banner and the alert marker are drawn


@needs_chromium
def test_console_check_sees_an_external_resource(report, tmp_path):
    """Negative control: one external image → a CSP refusal on the console."""
    bad = tmp_path / "bad.html"
    bad.write_text(report.read_text(encoding="utf-8").replace("<main>", '<main><img src="https://example.invalid/x.png">', 1),
                   encoding="utf-8")
    code, console = _chromium(bad, tmp_path / "bad.png", tmp_path)
    assert code == 0 and any("Content Security Policy" in line for line in console), console
