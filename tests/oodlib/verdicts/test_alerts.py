"""The alert rule at its boundaries (binary fractions, so the arithmetic is exact)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from oodlib.verdicts import alert_history, decide_alert, decisions_frame

E_RATE, E_HI, MARGIN = 0.0390625, 0.0625, 0.125  # lo − E_HI = MARGIN exactly at lo = 0.1875


def _history(lo=(0.0, 0.0, 0.1875), drift=(0.5, 0.5, 0.5), dates=("2026-11-29", "2026-11-30", "2026-12-01"), **extra):
    rate = [v + 0.03125 for v in lo]
    return pd.DataFrame({"batch": list(dates), "n": 120, "rate": rate, "lo": list(lo), "hi": [v + 0.0625 for v in lo],
                         "drift_p": list(drift), **extra})


def test_rate_boundary_equal_margin_does_not_fire():
    d = decide_alert(_history(), E_RATE, E_HI, margin=MARGIN, alpha=0.01)
    assert d.batch == "2026-12-01" and not d.fire and not d.rate_fires and d.exit_code == 0
    assert d.reason.startswith("OK for batch 2026-12-01")


def test_rate_just_above_margin_fires():
    d = decide_alert(_history(lo=(0.0, 0.0, 0.1875 + 2**-20)), E_RATE, E_HI, margin=MARGIN, alpha=0.01)
    assert d.fire and d.rate_fires and not d.drift_fires and d.exit_code == 1
    assert d.reason.startswith("ALERT for batch 2026-12-01") and "margin" in d.reason


def test_zero_margin():
    assert not decide_alert(_history(lo=(0, 0, E_HI)), E_RATE, E_HI, margin=0.0).fire
    assert decide_alert(_history(lo=(0, 0, E_HI + 2**-20)), E_RATE, E_HI, margin=0.0).fire


@pytest.mark.parametrize("p, fires", [(0.01, False), (0.01 - 1e-12, True), (0.0, True), (np.nan, False)])
def test_drift_boundary(p, fires):
    d = decide_alert(_history(drift=(0.5, 0.5, p)), E_RATE, E_HI, margin=MARGIN, alpha=0.01)
    assert d.fire is fires and d.drift_fires is fires and not d.rate_fires


def test_bonferroni_over_drift_columns():
    h = _history(drift=(0.5, 0.5, 0.006), ks_p=[0.5, 0.5, 0.5])
    kw = dict(margin=MARGIN, alpha=0.01)
    assert not decide_alert(h, E_RATE, E_HI, drift_columns=("drift_p", "ks_p"), **kw).fire  # level 0.005
    assert decide_alert(h, E_RATE, E_HI, drift_columns=("drift_p",), **kw).fire  # level 0.01
    h.loc[2, "ks_p"] = 0.004
    d = decide_alert(h, E_RATE, E_HI, drift_columns=("drift_p", "ks_p"), **kw)
    assert d.fire and d.drift_fires and "ks_p" in d.reason and "alpha 0.01 / 2 tests" in d.reason
    # a column the history lacks is not tested and not counted
    assert decide_alert(h.drop(columns="ks_p"), E_RATE, E_HI, drift_columns=("drift_p", "ks_p"), **kw).fire


def test_empty_batch_never_fires_on_rate():
    d = decide_alert(_history(lo=(0.0, 0.0, np.nan)), E_RATE, E_HI, margin=MARGIN)
    assert not d.fire and "no images" in d.reason


def test_newest_by_date_not_row_order_and_trend():
    h = _history(lo=(0.5, 0.0, 0.25), dates=("2026-12-01", "2026-11-29", "2026-11-30"))
    ds = alert_history(h, E_RATE, E_HI, margin=MARGIN)
    assert [d.batch for d in ds] == ["2026-11-29", "2026-11-30", "2026-12-01"]
    assert [d.rising for d in ds] == [0, 1, 2]
    assert ds[-1].change == pytest.approx(0.25) and ds[-1].previous_rate == pytest.approx(0.28125)
    assert "rising 2 batches in a row" in ds[-1].reason
    assert decide_alert(h, E_RATE, E_HI, margin=MARGIN).batch == "2026-12-01"
    frame = decisions_frame(ds)
    assert list(frame.batch) == ["2026-11-29", "2026-11-30", "2026-12-01"] and list(frame.fire) == [False, True, True]


def test_json_and_input_checks():
    d = decide_alert(_history(drift=(0.5, 0.5, np.nan)), E_RATE, E_HI, margin=MARGIN)
    out = json.loads(d.to_json())
    assert out["exit_code"] == 0 and out["drift"] == {"drift_p": None} and out["batch"] == "2026-12-01"
    with pytest.raises(ValueError, match="repeated"):
        decide_alert(_history(dates=("a", "a", "b")), E_RATE, E_HI)
    with pytest.raises(ValueError, match="lo"):
        decide_alert(_history().drop(columns="lo"), E_RATE, E_HI)
    with pytest.raises(ValueError, match="no batches"):
        decide_alert(_history().iloc[:0], E_RATE, E_HI)
