"""The estimator contract (:mod:`oodlib.estimator`), checked for every registered estimator —
every OOD detector, error detector and long-tail method, each in its ``contract_variants`` —
like scikit-learn's ``parametrize_with_checks``. Adding an estimator adds it here by itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

import oodlib.detectors  # noqa: F401  (registers the detectors)
import oodlib.errors  # noqa: F401
import oodlib.longtail  # noqa: F401
from oodlib.detectors import Detector, Head, ScoreInputs
from oodlib.errors import ErrorDetector
from oodlib.estimator import Estimator, NotFittedError, subclasses
from oodlib.longtail import GraphOOD
from oodlib.stats import FitStats

N, D, C, K = 240, 12, 4, 6


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % C
    centres = rng.normal(0, 2, (C, D))
    h = np.maximum(centres[labels] + rng.normal(0, 1, (N, D)), 0).astype(np.float32)
    head = Head(rng.normal(0, 0.5, (C, D)).astype(np.float32), rng.normal(0, 0.1, C).astype(np.float32))
    return rng, h, labels, head


class DetectorCase:
    """OOD detectors: fit(features, labels, head) → score(ScoreInputs) (N,) float32. EMBED columns
    are random (N,) floats, or what the detector's ``contract_extras(n, rng)`` draws (vector
    columns with a per-layer layout); a detector fitted on them (``fit_columns``) gets them in fit."""

    @staticmethod
    def extras(est, rng):
        if hasattr(est, "contract_extras"):
            return est.contract_extras(N, rng)
        return {c: rng.random(N).astype(np.float32) for c in est.requires if c not in ("features", "logits")}

    def fit(self, est):
        rng, h, y, head = _problem()
        if getattr(est, "fit_columns", ()):
            return est.fit(h, y, head, extras=self.extras(est, rng))
        return est.fit(h, y, head)

    def output(self, est):
        rng, h, _, head = _problem(1)
        return est.score(ScoreInputs(h, head.logits(h), self.extras(est, rng)))


class ErrorCase:
    """Error detectors: fit(x, wrong, x_val, wrong_val) → risk(x) (N,) float32."""

    def _data(self, seed):
        rng = np.random.default_rng(seed)
        wrong = rng.random(N) < 0.3
        x = (rng.normal(0, 1, (N, K)) + wrong[:, None] * 1.5).astype(np.float32)
        return x[:, :2] if self.two else x, wrong

    def __init__(self, est):
        self.two = getattr(est, "kind", None) is not None  # a fusion: [LCR, conductance risk]

    def fit(self, est):
        x, wrong = self._data(0)
        xv, wv = self._data(1)
        return est.fit(x, wrong, xv, wv)

    def output(self, est):
        return est.risk(self._data(2)[0])


class GraphCase:
    """The long-tail graph method: fit(features, labels, role) → predict(features)["score"]."""

    def fit(self, est):
        _, h, y, _ = _problem()
        role = np.where(np.arange(N) < 200, "train", "val").astype(object)
        role[::10] = "oe"
        return est.fit(h, np.where(role == "oe", -1, y), role)

    def output(self, est):
        return est.predict(_problem(1)[1][:60])["score"]


def _case(est):
    if isinstance(est, Detector):
        return DetectorCase()
    if isinstance(est, ErrorDetector):
        return ErrorCase(est)
    if isinstance(est, GraphOOD):
        return GraphCase()
    raise AssertionError(f"{type(est).__name__}: no contract case for this kind of estimator")


CASES = [pytest.param(cls, params, id=f"{cls.name}-{json.dumps(params, sort_keys=True)}" if params else cls.name)
         for cls in subclasses(Estimator) for params in cls.contract_variants()]


def test_every_capability_is_registered():
    names = {cls.name for cls, *_ in (c.values for c in CASES)}
    assert {"msp", "line", "knn", "odin", "conductance", "fusion", "graph_ood"} <= names


@pytest.mark.parametrize("cls, params", CASES)
def test_hyperparameters_are_init_arguments(cls, params):
    est = cls(**params)
    assert est.params() == cls(**est.params()).params()  # params() rebuilds an equal estimator
    json.dumps(est.params())  # JSON-able: it goes into the state file and MLflow
    assert not est.fitted_attributes(), "fitted attributes must not exist before fit"


@pytest.mark.parametrize("cls, params", CASES)
def test_unfitted_use_raises(cls, params):
    est = cls(**params)
    if est.stateless:
        return
    with pytest.raises(NotFittedError):
        _case(est).output(est)
    with pytest.raises(NotFittedError):
        est.state_dict()


@pytest.mark.parametrize("cls, params", CASES)
def test_fit_returns_self_and_output_shape(cls, params):
    est = cls(**params)
    case = _case(est)
    assert case.fit(est) is est and est.is_fitted
    out = case.output(est)
    assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
    public = {k for k in vars(est) if not k.startswith("_")}
    assert public - set(cls.param_names()) <= {k for k in public if k.endswith("_")}, "fitted attributes end in _"


@pytest.mark.parametrize("cls, params", CASES)
def test_save_load_round_trip(cls, params, tmp_path):
    est = cls(**params)
    case = _case(est)
    case.fit(est)
    clone = cls.load(est.save(tmp_path / "est.safetensors"))
    assert clone.params() == est.params()
    np.testing.assert_array_equal(case.output(clone), case.output(est))
    other = next(c for c in subclasses(Estimator) if c is not cls)
    with pytest.raises(ValueError, match="holds a"):
        other.load(tmp_path / "est.safetensors")


@pytest.mark.parametrize("cls, params", CASES)
def test_fit_is_deterministic(cls, params, tmp_path):
    a, b = cls(**params), cls(**params)
    case = _case(a)
    case.fit(a)
    case.fit(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.mark.parametrize("cls, params", [c for c in CASES if issubclass(c.values[0], Detector)])
def test_fit_stats_from_partials_equals_fit(cls, params):
    """Detectors that fit from partial sums: merged partials (any order) give fit()'s scores."""
    est = cls(**params)
    if est.stateless or "bank" in est.fit_needs:
        return
    _, h, y, head = _problem()
    second, acts = "second" in est.fit_needs, "activations" in est.fit_needs
    parts = [FitStats.from_batch(h[i::3], y[i::3], C, second, acts) for i in range(3)]
    merged = parts[2].merge(parts[0]).merge(parts[1])
    from_stats = cls(**params).fit_stats(merged, head)
    full = FitStats.from_batch(h, y, C, second, acts)
    from_full = cls(**params).fit_stats(full, head)
    case = DetectorCase()
    np.testing.assert_allclose(case.output(from_stats), case.output(from_full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(case.output(from_stats), case.output(cls(**params).fit(h, y, head)), rtol=2e-3, atol=1e-4)
