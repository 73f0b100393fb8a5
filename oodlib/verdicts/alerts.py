"""The nightly alert: does the newest incoming batch call for a person?

The rule, for one batch, with its flag rate's Wilson interval [lo, hi]
(:func:`oodlib.verdicts.rates.flag_rate_table`) and the ID flag rate expected from the OOD
threshold with its interval [expected_lo, expected_hi] (:class:`~oodlib.verdicts.thresholds.OODThreshold`
``id_flag_rate*``):

* **rate** fires when ``lo − expected_hi > margin`` (strictly): even the most favourable reading
  of tonight's batch flags more than ``margin`` (an absolute rate, 0.02 = 2 points) above the
  least favourable reading of what ID data should give. Equality does not fire; a batch without
  images (lo = NaN) never fires on rate.
* **drift** fires when a drift p-value < ``alpha / m`` (strictly; Bonferroni over the m drift
  columns given, so two tests at alpha = 0.01 each test at 0.005). NaN p-values (a test that did
  not run) are ignored.

The alert fires when either fires. Trend fields (``previous_rate``, ``change``, ``rising``: the
number of consecutive batches, ending with this one, whose rate rose over the one before) are
reported with every decision but never fire by themselves. Batches are ordered by their date
(``pd.to_datetime``; by string when a value is not a date).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd


@dataclass
class AlertDecision:
    """The decision for one batch. ``fire``: act on it; ``exit_code``: 1 when firing (for cron),
    else 0; ``reason``: one human-readable paragraph; ``reasons``: the sentences it is made of."""

    batch: str
    fire: bool
    rate_fires: bool
    drift_fires: bool
    reason: str
    reasons: list[str]
    n: float
    rate: float
    lo: float
    hi: float
    expected_rate: float
    expected_hi: float
    margin: float
    alpha: float
    drift: dict[str, float] = field(default_factory=dict)
    previous_rate: float = float("nan")
    change: float = float("nan")
    rising: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.fire else 0

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN → None) with ``exit_code``."""
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return {k: clean(v) for k, v in {**asdict(self), "exit_code": self.exit_code}.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _ordered(history: pd.DataFrame, batch: str) -> pd.DataFrame:
    if batch not in history.columns:
        raise ValueError(f"history needs a {batch!r} column")
    if history[batch].duplicated().any():
        raise ValueError(f"history has repeated {batch!r} values")
    dates = pd.to_datetime(history[batch].astype(str), errors="coerce")
    key = dates if not dates.isna().any() else history[batch].astype(str)
    return history.assign(_order=key.to_numpy()).sort_values("_order").drop(columns="_order").reset_index(drop=True)


def _decide(row: pd.Series, batch: str, expected_rate: float, expected_hi: float, margin: float, alpha: float,
            drift_columns: Sequence[str], previous_rate: float, rising: int) -> AlertDecision:
    lo = float(row["lo"])
    rate = float(row.get("rate", np.nan))
    hi = float(row.get("hi", np.nan))
    n = float(row.get("n", np.nan))
    excess = lo - expected_hi
    rate_fires = bool(np.isfinite(excess) and excess > margin)
    level = alpha / max(1, len(drift_columns))
    drift = {c: float(row[c]) for c in drift_columns}
    hits = [c for c, p in drift.items() if np.isfinite(p) and p < level]
    reasons = []
    band = f"[{_pct(lo)}, {_pct(hi)}]"
    if not np.isfinite(lo):
        reasons.append("no images in this batch: the flag rate cannot be tested")
    elif rate_fires:
        reasons.append(f"flag rate {_pct(rate)} {band}: its lower bound is {100 * excess:.1f} points above the expected "
                       f"ID rate's upper bound {_pct(expected_hi)} (more than the {100 * margin:.1f}-point margin)")
    else:
        reasons.append(f"flag rate {_pct(rate)} {band} is consistent with the expected ID rate {_pct(expected_rate)}: "
                       f"its lower bound is not more than {100 * margin:.1f} points above that rate's upper bound "
                       f"{_pct(expected_hi)}")
    for c, p in drift.items():
        if not np.isfinite(p):
            continue
        word = "drift detected" if c in hits else "no drift"
        sign = "<" if c in hits else "≥"
        reasons.append(f"{word}: {c} = {p:.3g} {sign} {level:.3g}" + (f" (alpha {alpha:g} / {len(drift_columns)} tests)" if len(drift_columns) > 1 else ""))
    change = rate - previous_rate
    if np.isfinite(change):
        reasons.append(f"{'up' if change > 0 else 'down' if change < 0 else 'unchanged'} {abs(100 * change):.1f} points "
                       f"from the previous batch" + (f", rising {rising} batches in a row" if rising > 1 else ""))
    fire = rate_fires or bool(hits)
    head = "ALERT" if fire else "OK"
    return AlertDecision(
        batch=str(row[batch]), fire=fire, rate_fires=rate_fires, drift_fires=bool(hits),
        reason=f"{head} for batch {row[batch]}: " + "; ".join(reasons) + ".", reasons=reasons, n=n, rate=rate, lo=lo,
        hi=hi, expected_rate=float(expected_rate), expected_hi=float(expected_hi), margin=float(margin),
        alpha=float(alpha), drift=drift, previous_rate=float(previous_rate), change=float(change), rising=int(rising),
    )


def alert_history(history: pd.DataFrame, expected_rate: float, expected_hi: float, margin: float = 0.02,
                  alpha: float = 0.01, drift_columns: Sequence[str] = ("drift_p",), batch: str = "batch") -> list[AlertDecision]:
    """The decision for every batch of ``history``, oldest first.

    ``history``: one row per batch with ``batch`` (a date), ``lo`` (the flag rate's lower Wilson
    bound) and optionally ``rate``, ``hi``, ``n`` and the ``drift_columns`` (p-values, NaN when
    not tested; columns absent from ``history`` are dropped from the test and the Bonferroni
    count). See the module docstring for the rule.
    """
    if "lo" not in history.columns:
        raise ValueError("history needs the flag rate's lower Wilson bound 'lo'")
    if not 0 < alpha < 1 or margin < 0:
        raise ValueError(f"need 0 < alpha < 1 and margin ≥ 0, got alpha={alpha}, margin={margin}")
    ordered = _ordered(history, batch)
    columns = [c for c in drift_columns if c in ordered.columns]
    rates = ordered["rate"].to_numpy(np.float64) if "rate" in ordered.columns else np.full(len(ordered), np.nan)
    out, rising = [], 0
    for i, (_, row) in enumerate(ordered.iterrows()):
        prev = rates[i - 1] if i else np.nan
        rising = rising + 1 if i and rates[i] > prev else 0
        out.append(_decide(row, batch, expected_rate, expected_hi, margin, alpha, columns, prev, rising))
    return out


def decide_alert(history: pd.DataFrame, expected_rate: float, expected_hi: float, margin: float = 0.02,
                 alpha: float = 0.01, drift_columns: Sequence[str] = ("drift_p",), batch: str = "batch") -> AlertDecision:
    """The decision for the newest batch of ``history`` (see :func:`alert_history`)."""
    if history.empty:
        raise ValueError("no batches to decide on")
    return alert_history(history, expected_rate, expected_hi, margin, alpha, drift_columns, batch)[-1]


def decisions_frame(decisions: list[AlertDecision]) -> pd.DataFrame:
    """Decisions as a table (batch, fire, rate_fires, drift_fires, rate, lo, hi, change, rising, reason)."""
    cols = ["batch", "fire", "rate_fires", "drift_fires", "rate", "lo", "hi", "change", "rising", "reason"]
    return pd.DataFrame([{c: getattr(d, c) for c in cols} for d in decisions], columns=cols)
