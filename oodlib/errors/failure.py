"""Failure detection the FD-Shifts way: confidence scores from stored logits, their calibration,
and the evaluation per failure source with bootstrap intervals.

A *confidence* κ is higher = more trusted; a prediction *fails* when it is wrong (``correct`` =
False; an OOD image of a new class always fails). The metrics (AURC, E-AURC, AUGRC, AUROC_f,
FPR@95_f, ECE) are :func:`oodlib.metrics.failure_metrics`; their conventions follow
IML-DKFZ/fd-shifts@c4467ae.

* Logit baselines (:class:`LogitConfidences`, fitted on the validation part, no model access):
  ``msr`` max softmax, ``mls`` max logit, ``energy`` logsumexp, ``entropy`` −H(p), ``gen`` (γ 0.1,
  M = min(100, C)), ``doctor_alpha``/``doctor_beta`` (−D_α, −D_β at a temperature chosen on
  val; ε = 0: without the images there is no input perturbation), ``tempscale_msr`` (max softmax
  at the NLL-optimal temperature on val).
* Calibration for the ECE (:func:`calibrate`): probabilities of being correct are used as they
  are; every other confidence is Platt-scaled on val (:class:`PlattScaling`, FD-Shifts'
  ``PlattScaling``). Ranking metrics always use the raw confidence (a Platt map is monotone, but
  it can saturate to ties in float64).
* :func:`failure_table`: every metric of every method on every :class:`FailureSource`, with
  seeded percentile-bootstrap 95% intervals (FD-Shifts' study bootstrap: resamples of the
  source's size with replacement, stratified by dataset for new-class sources, where the ID
  rows that were misclassified are dropped *after* resampling).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import log_softmax, logsumexp, softmax

from oodlib.metrics import FAILURE_METRICS, auroc_f, failure_metrics

LOGIT_METHODS = ("msr", "mls", "energy", "entropy", "gen", "doctor_alpha", "doctor_beta", "tempscale_msr")
#: logit baselines whose confidence already is a probability of being correct (no Platt scaling)
PROBABILITY_LOGIT_METHODS = ("msr", "tempscale_msr")
#: DOCTOR's temperature candidates (the authors' grid was not verified; ε is fixed at 0)
DOCTOR_T_GRID = (1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


def _logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be N×C with C ≥ 2, got shape {z.shape}")
    return z


# --- confidence scores from logits ---------------------------------------------------------------


def msr(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Maximum softmax response max_k softmax(z/T)_k (T = 1: plain MSR / MSP)."""
    return softmax(_logits(logits) / temperature, axis=1).max(1)


def mls(logits: np.ndarray) -> np.ndarray:
    """Maximum logit score max_k z_k."""
    return _logits(logits).max(1)


def energy(logits: np.ndarray) -> np.ndarray:
    """Negative energy logsumexp_k z_k (T = 1)."""
    return logsumexp(_logits(logits), axis=1)


def neg_entropy(logits: np.ndarray) -> np.ndarray:
    """Negative predictive entropy Σ_k p_k log p_k (exact, from log-softmax: no clipping)."""
    logp = log_softmax(_logits(logits), axis=1)
    return np.sum(np.exp(logp) * logp, axis=1)


def gen(logits: np.ndarray, gamma: float = 0.1, m: int = 100) -> np.ndarray:
    """GEN (OpenOOD): −Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ over the M largest probabilities
    (M = min(m, C))."""
    p = softmax(_logits(logits), axis=1)
    top = -np.sort(-p, axis=1)[:, : min(int(m), p.shape[1])]
    return -np.sum(top**gamma * (1.0 - top) ** gamma, axis=1)


def doctor_alpha(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """DOCTOR D_α as a confidence: −(1 − Σ p²)/Σ p² with p = softmax(z/T) (ε = 0)."""
    g = np.sum(softmax(_logits(logits) / temperature, axis=1) ** 2, axis=1)
    return -(1.0 - g) / g


def doctor_beta(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """DOCTOR D_β as a confidence: −(1 − max p)/max p with p = softmax(z/T) (ε = 0); rank-
    equivalent to MSR at the same T."""
    m = msr(logits, temperature)
    return -(1.0 - m) / m


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(z/T)."""
    z = _logits(logits) / temperature
    y = np.asarray(labels, int)
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """Temperature scaling: the T in ``bounds`` minimising the validation NLL of softmax(z/T).

    NLL is convex in 1/T, so a bounded scalar search over log T finds the minimum; FD-Shifts
    and OpenOOD take one ``torch.optim.LBFGS(lr=0.01, max_iter=50)`` step from T = 1 (1.5 in
    OpenOOD), which can stop short of it."""
    from scipy.optimize import minimize_scalar

    z, y = _logits(logits), np.asarray(labels, int)
    if len(y) == 0:
        raise ValueError("temperature scaling needs labelled validation logits")
    res = minimize_scalar(lambda t: nll(z, y, float(np.exp(t))), bounds=tuple(np.log(bounds)), method="bounded",
                          options={"xatol": 1e-7})
    return float(np.exp(res.x))


def fit_doctor_temperature(logits: np.ndarray, correct: np.ndarray, kind: str, grid: tuple[float, ...] = DOCTOR_T_GRID) -> float:
    """The DOCTOR temperature of ``grid`` with the best validation AUROC_f (ties: the smallest T;
    T = 1 when the validation rows are all correct or all wrong)."""
    score = {"alpha": doctor_alpha, "beta": doctor_beta}[kind]
    c = np.asarray(correct, bool)
    if c.all() or not c.any():
        return 1.0
    aurocs = [auroc_f(score(logits, t), c) for t in grid]
    return float(grid[int(np.nanargmax(aurocs))])


@dataclass
class LogitConfidences:
    """The logit baselines with their fitted hyperparameters (:meth:`fit` on the validation
    part); calling it gives ``{method: confidence (N,)}`` for :data:`LOGIT_METHODS`."""

    temperature: float = 1.0
    doctor_temperature: dict[str, float] = field(default_factory=lambda: {"alpha": 1.0, "beta": 1.0})
    gen_gamma: float = 0.1
    gen_m: int = 100

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> "LogitConfidences":
        """T of ``tempscale_msr`` by validation NLL, DOCTOR's T by validation AUROC_f."""
        z, y = _logits(logits), np.asarray(labels, int)
        correct = z.argmax(1) == y
        return cls(fit_temperature(z, y), {k: fit_doctor_temperature(z, correct, k) for k in ("alpha", "beta")})

    def __call__(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        z = _logits(logits)
        return {
            "msr": msr(z), "mls": mls(z), "energy": energy(z), "entropy": neg_entropy(z),
            "gen": gen(z, self.gen_gamma, self.gen_m),
            "doctor_alpha": doctor_alpha(z, self.doctor_temperature["alpha"]),
            "doctor_beta": doctor_beta(z, self.doctor_temperature["beta"]),
            "tempscale_msr": msr(z, self.temperature),
        }

    def params(self) -> dict[str, float]:
        return {"tempscale_t": self.temperature, "doctor_alpha_t": self.doctor_temperature["alpha"],
                "doctor_beta_t": self.doctor_temperature["beta"], "doctor_eps": 0.0, "gen_gamma": self.gen_gamma,
                "gen_m": self.gen_m}


# --- calibration for the ECE -----------------------------------------------------------------------


@dataclass
class PlattScaling:
    """Platt scaling of a confidence to a probability of being correct: p = 1/(1 + exp(a·κ + b)),
    (a, b) fitted by Platt's method (logistic loss on the smoothed targets (N₊+1)/(N₊+2) and
    1/(N₋+2), L-BFGS from a = 0, b = ln((N₋+1)/(N₊+1)), inputs rescaled by max|κ| when it is
    ≥ 30) — a transcription of scikit-learn's ``_sigmoid_calibration``, which FD-Shifts calls."""

    a: float
    b: float

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray) -> "PlattScaling":
        from scipy.optimize import minimize

        f = np.asarray(confidence, np.float64).ravel()
        y = np.asarray(correct, bool).ravel()
        if len(f) == 0:
            raise ValueError("Platt scaling needs validation confidences")
        big = float(np.max(np.abs(f)))
        scale = big if big >= 30 else 1.0
        f = f / scale
        n_neg, n_pos = float(np.sum(~y)), float(np.sum(y))
        t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

        def loss_grad(ab: np.ndarray) -> tuple[float, np.ndarray]:
            raw = -(ab[0] * f + ab[1])  # log-odds of "correct"
            loss = np.sum(np.logaddexp(0.0, raw) - t * raw)
            g = 1.0 / (1.0 + np.exp(-raw)) - t  # d loss / d raw
            return float(loss), np.array([-g @ f, -g.sum()])

        ab0 = np.array([0.0, np.log((n_neg + 1.0) / (n_pos + 1.0))])
        res = minimize(loss_grad, ab0, method="L-BFGS-B", jac=True, options={"gtol": 1e-6, "ftol": 64 * np.finfo(float).eps})
        return cls(float(res.x[0] / scale), float(res.x[1]))

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        return expit(-(self.a * np.asarray(confidence, np.float64) + self.b))


def calibrate(conf_val: np.ndarray, correct_val: np.ndarray, is_probability: bool) -> PlattScaling | None:
    """The map to a probability of being correct for the ECE: None (use as is) for a probability,
    else Platt scaling fitted on the validation rows."""
    return None if is_probability else PlattScaling.fit(conf_val, correct_val)


# --- evaluation per failure source -----------------------------------------------------------------


@dataclass
class FailureSource:
    """One failure source: the rows (indices into the method arrays) and whether each prediction
    is correct. ``strata``: bootstrap strata (None: unstratified); ``exclude``: rows dropped from
    the point estimate and from every resample after resampling (FD-Shifts' new-class protocol
    drops misclassified ID rows)."""

    name: str
    kind: str  # iid | corruption | new-class
    rows: np.ndarray
    correct: np.ndarray
    strata: np.ndarray | None = None
    exclude: np.ndarray | None = None

    def kept(self) -> np.ndarray:
        return np.ones(len(self.rows), bool) if self.exclude is None else ~np.asarray(self.exclude, bool)


def bootstrap_indices(n: int, n_bootstrap: int, seed: int, strata: np.ndarray | None = None):
    """``n_bootstrap`` resamples (each n indices with replacement), stratified: every stratum keeps
    its size. Seeded by ``seed`` alone, so every method of a source sees the same resamples."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for _ in range(n_bootstrap):
        yield np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])


def evaluate_source(
    source: FailureSource, confidence: dict[str, np.ndarray], probability: dict[str, np.ndarray],
    n_bootstrap: int = 200, seed: int = 0, n_bins: int = 20,
) -> dict[str, dict[str, float]]:
    """{method: {metric: value, metric_lo, metric_hi}} on one source. ``confidence``/``probability``
    hold the method's values on the source's rows (same order as ``source.rows``). Intervals are
    the 2.5/97.5 percentiles of the bootstrap values (NaN resamples, e.g. without a failure, are
    ignored; the ECE is biased upward under resampling, so its interval can lie above the point
    value); ``n_bootstrap = 0`` gives no intervals."""
    keep = source.kept()
    c = np.asarray(source.correct, bool)
    out = {m: failure_metrics(confidence[m][keep], c[keep], probability[m][keep], n_bins) for m in confidence}
    if n_bootstrap <= 0:
        return out
    values = {m: np.empty((n_bootstrap, len(FAILURE_METRICS))) for m in confidence}
    for b, idx in enumerate(bootstrap_indices(len(c), n_bootstrap, seed, source.strata)):
        idx = idx[keep[idx]]
        for m in confidence:
            r = failure_metrics(confidence[m][idx], c[idx], probability[m][idx], n_bins)
            values[m][b] = [r[k] for k in FAILURE_METRICS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN metric (a resample without failures)
        for m, v in values.items():
            lo, hi = np.nanpercentile(v, [2.5, 97.5], axis=0)
            for i, k in enumerate(FAILURE_METRICS):
                out[m][f"{k}_lo"], out[m][f"{k}_hi"] = float(lo[i]), float(hi[i])
    return out


def failure_table(
    sources: list[FailureSource], confidence: dict[str, np.ndarray], probability: dict[str, np.ndarray],
    n_bootstrap: int = 200, seed: int = 0, n_bins: int = 20,
) -> pd.DataFrame:
    """Metrics rows (task ``failure``, method, dataset = the source's name, metric, value) of
    every method on every source; ``confidence``/``probability``: {method: values over all rows}
    (the sources index into them). Also rows of method ``model`` per source: ``n`` (rows
    evaluated), ``acc`` (their accuracy; OOD rows count as failures). Source i is bootstrapped
    with seed ``seed + i``."""
    rows = []
    for i, s in enumerate(sources):
        keep = s.kept()
        rows += [dict(method="model", dataset=s.name, metric="n", value=float(keep.sum())),
                 dict(method="model", dataset=s.name, metric="acc", value=float(np.mean(np.asarray(s.correct, bool)[keep])))]
        res = evaluate_source(s, {m: v[s.rows] for m, v in confidence.items()}, {m: v[s.rows] for m, v in probability.items()},
                              n_bootstrap, seed + i, n_bins)
        rows += [dict(method=m, dataset=s.name, metric=k, value=v) for m, r in res.items() for k, v in r.items()]
    return pd.DataFrame(rows, columns=["method", "dataset", "metric", "value"]).assign(task="failure")[
        ["task", "method", "dataset", "metric", "value"]]
