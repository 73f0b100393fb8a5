"""Wilson intervals against the closed form, per-batch flag rates, per-image verdicts."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from oodlib.verdicts import (
    flag_rate_table,
    image_verdicts,
    ood_threshold,
    risk_threshold,
    top_flagged,
    wilson_interval,
)


def _wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_hand_computed():
    lo, hi = wilson_interval(5, 100)
    # by hand: centre (0.05 + 0.019207)/1.038415 = 0.066648, half 1.887457·√0.00057104 = 0.045104
    assert lo == pytest.approx(0.021543, abs=1e-5) and hi == pytest.approx(0.111752, abs=1e-5)
    for k, n in ((5, 100), (0, 20), (20, 20), (3, 7), (31, 120)):
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)


def test_wilson_edges():
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-15)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    lo90, hi90 = wilson_interval(5, 100, 0.90)
    lo95, hi95 = wilson_interval(5, 100)
    assert lo95 < lo90 < hi90 < hi95
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_flag_rate_table():
    frame = pd.DataFrame({"batch": ["b2"] * 4 + ["b1"] * 10, "flagged": [True, False, False, False] + [True] * 3 + [False] * 7})
    t = flag_rate_table(frame)
    assert list(t.columns) == ["batch", "n", "k", "rate", "lo", "hi"]
    assert list(t.batch) == ["b1", "b2"] and list(t.n) == [10, 4] and list(t.k) == [3, 1]
    assert list(t.rate) == [0.3, 0.25]
    assert (t.lo[0], t.hi[0]) == pytest.approx(_wilson_by_hand(3, 10))
    with pytest.raises(ValueError, match="missing"):
        flag_rate_table(frame, flag="nope")


def test_image_verdicts_and_top_flagged():
    ood = ood_threshold(np.arange(1.0, 21.0), 0.95, n_boot=20)  # t = 2
    risk = risk_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=20)  # t = 0.8
    v = image_verdicts(["a", "b", "c", "d", "e"], [1.0, 0.5, 3.0, 5.0, 1.5], ood, [0.1, 0.9, 0.85, 0.2, 0.95], risk, "msp", "lcr")
    assert list(v.verdict) == ["ood", "ood+likely-wrong", "likely-wrong", "ok", "ood+likely-wrong"]
    assert list(v.flagged) == [True, True, True, False, True]
    assert v.why[3] == "" and v.reasons[3] == []
    assert "msp 0.5 < threshold 2" in v.why[1] and "lcr 0.9 ≥ threshold 0.8" in v.why[1]
    assert list(v.reasons) == [["ood:msp"], ["ood:msp", "risk:lcr"], ["risk:lcr"], [], ["ood:msp", "risk:lcr"]]
    assert list(v.is_ood) == [True, True, False, False, True] and list(v.likely_wrong) == [False, True, True, False, True]
    top = top_flagged(v, 3)
    assert list(top.image_id) == ["b", "a", "e"]  # OOD ones by lowest score first
    assert list(top_flagged(v, 10).image_id) == ["b", "a", "e", "c"]  # then the risk-only one
    no_risk = image_verdicts(["a", "b"], [1.0, 3.0], ood)
    assert list(no_risk.verdict) == ["ood", "ok"] and no_risk.risk.isna().all()
    with pytest.raises(ValueError):
        image_verdicts(["a"], [1.0, 2.0], ood)
