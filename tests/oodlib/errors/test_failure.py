"""Failure detection: the logit baselines, temperature and Platt scaling (against fd-shifts'
TemperatureScaling and scikit-learn's Platt fit), the bootstrap and the per-source table."""
import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp, softmax

from oodlib.errors import failure as F
from oodlib.metrics import FAILURE_METRICS, failure_metrics


def _logits(seed=0, n=400, c=10, signal=2.0, temperature=1.0):
    """Logits whose labels are drawn from softmax(z / temperature): the NLL-optimal T is ≈ that."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, signal, (n, c))
    p = softmax(z / temperature, axis=1)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z, y


# --- baselines -------------------------------------------------------------------------------


def test_logit_baselines_formulas():
    z, _ = _logits(n=50)
    p = softmax(z, axis=1)
    np.testing.assert_allclose(F.msr(z), p.max(1))
    np.testing.assert_allclose(F.msr(z, 3.0), softmax(z / 3, axis=1).max(1))
    np.testing.assert_allclose(F.mls(z), z.max(1))
    np.testing.assert_allclose(F.energy(z), logsumexp(z, axis=1))
    np.testing.assert_allclose(F.neg_entropy(z), np.sum(p * np.log(p), axis=1))
    assert (F.neg_entropy(z) <= 0).all() and F.neg_entropy(np.zeros((1, 4)))[0] == pytest.approx(-np.log(4))
    # GEN, brute force: the M largest probabilities
    for m in (3, 100):
        top = np.sort(p, axis=1)[:, ::-1][:, :m]
        np.testing.assert_allclose(F.gen(z, 0.1, m), -np.sum(top**0.1 * (1 - top) ** 0.1, axis=1))
    pt = softmax(z / 2.0, axis=1)
    g = np.sum(pt**2, axis=1)
    np.testing.assert_allclose(F.doctor_alpha(z, 2.0), -(1 - g) / g)
    np.testing.assert_allclose(F.doctor_beta(z, 2.0), -(1 - pt.max(1)) / pt.max(1))
    # D_β is rank-equivalent to MSR at the same T; higher = more confident everywhere
    assert (np.argsort(F.doctor_beta(z, 2.0)) == np.argsort(F.msr(z, 2.0))).all()
    with pytest.raises(ValueError, match="N×C"):
        F.msr(np.zeros(5))


def test_baselines_are_stable_on_large_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]])
    assert np.isfinite(F.neg_entropy(z)).all() and np.isfinite(F.energy(z)).all()
    assert F.msr(z)[0] == 1.0 and F.neg_entropy(z)[0] == pytest.approx(0.0, abs=1e-12)


# --- temperature scaling -----------------------------------------------------------------------


def fd_temperature_scaling(val_logits, val_labels):
    """fd-shifts ``TemperatureScaling.__init__`` (analysis/__init__.py), transcribed."""
    import torch

    temperature = torch.ones(1).requires_grad_(True)
    logits, labels = torch.tensor(val_logits), torch.tensor(val_labels).long()
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def _eval():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(_eval)
    return temperature.item()


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_minimises_nll(true_t):
    z, y = _logits(seed=1, n=3000, temperature=true_t)
    t = F.fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.1)
    for other in (t * 0.98, t * 1.02):
        assert F.nll(z, y, t) < F.nll(z, y, other)
    # fd-shifts' single LBFGS(lr=0.01, max_iter=50) step from T = 1 never beats the exact minimum
    t_fd = fd_temperature_scaling(z, y)
    assert F.nll(z, y, t) <= F.nll(z, y, t_fd) + 1e-9


def test_doctor_temperature_from_the_grid():
    z, y = _logits(seed=2, n=600)
    correct = z.argmax(1) == y
    t = F.fit_doctor_temperature(z, correct, "alpha")
    assert t in F.DOCTOR_T_GRID
    from oodlib.metrics import auroc_f

    best = max(auroc_f(F.doctor_alpha(z, s), correct) for s in F.DOCTOR_T_GRID)
    assert auroc_f(F.doctor_alpha(z, t), correct) == pytest.approx(best)
    assert F.fit_doctor_temperature(z, np.ones(len(z), bool), "beta") == 1.0


def test_logit_confidences_fit_and_call():
    z, y = _logits(seed=3, n=500, temperature=2.0)
    lc = F.LogitConfidences.fit(z[:250], y[:250])
    assert lc.temperature == pytest.approx(F.fit_temperature(z[:250], y[:250]))
    conf = lc(z[250:])
    assert tuple(conf) == F.LOGIT_METHODS and all(v.shape == (250,) for v in conf.values())
    np.testing.assert_allclose(conf["tempscale_msr"], F.msr(z[250:], lc.temperature))
    assert lc.params()["doctor_eps"] == 0.0 and set(F.PROBABILITY_LOGIT_METHODS) <= set(F.LOGIT_METHODS)


# --- Platt scaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 80.0])  # 80: the inputs are rescaled by max|κ| (≥ 30)
def test_platt_matches_sklearn(scale):
    sk = pytest.importorskip("sklearn.calibration")
    if not hasattr(sk, "_sigmoid_calibration"):
        pytest.skip("this scikit-learn has no _sigmoid_calibration")
    rng = np.random.default_rng(4)
    k = rng.normal(size=400) * scale
    correct = rng.random(400) < 1 / (1 + np.exp(-1.5 * k / scale + 0.3))
    platt = F.PlattScaling.fit(k, correct)
    a, b = sk._sigmoid_calibration(k, correct)
    assert (platt.a, platt.b) == pytest.approx((a, b), rel=1e-5, abs=1e-8)
    np.testing.assert_allclose(platt(k), 1 / (1 + np.exp(k * a + b)), rtol=1e-5)
    assert platt.a < 0  # confidence rises with correctness: the map is increasing


def test_platt_is_calibrating():
    rng = np.random.default_rng(5)
    k = rng.normal(size=20000)
    correct = rng.random(20000) < 1 / (1 + np.exp(-(2 * k - 1)))
    p = F.PlattScaling.fit(k, correct)
    assert (p.a, p.b) == pytest.approx((-2.0, 1.0), abs=0.1)
    assert F.calibrate(k, correct, True) is None


# --- bootstrap and the table -------------------------------------------------------------------


def test_bootstrap_indices_seeded_and_stratified():
    strata = np.r_[np.zeros(30, bool), np.ones(10, bool)]
    a = list(F.bootstrap_indices(40, 5, seed=3, strata=strata))
    b = list(F.bootstrap_indices(40, 5, seed=3, strata=strata))
    assert all((x == y).all() for x, y in zip(a, b))
    assert all(len(x) == 40 and strata[x].sum() == 10 for x in a)  # every stratum keeps its size
    assert not all((x == y).all() for x, y in zip(a, F.bootstrap_indices(40, 5, seed=4, strata=strata)))


def _source_data(seed=0, n=300):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.8
    conf = {"good": rng.normal(correct * 2.0, 1.0), "bad": rng.normal(size=n)}
    prob = {m: 1 / (1 + np.exp(-v)) for m, v in conf.items()}
    return correct, conf, prob


def test_evaluate_source_point_estimates_and_intervals():
    correct, conf, prob = _source_data()
    src = F.FailureSource("iid", "iid", np.arange(len(correct)), correct)
    res = F.evaluate_source(src, conf, prob, n_bootstrap=100, seed=0)
    for m in conf:
        point = failure_metrics(conf[m], correct, prob[m])
        for k in FAILURE_METRICS:
            assert res[m][k] == pytest.approx(point[k])
            assert res[m][f"{k}_lo"] <= res[m][f"{k}_hi"]
        for k in ("aurc", "augrc", "auroc_f"):
            assert res[m][f"{k}_lo"] <= res[m][k] <= res[m][f"{k}_hi"]
    assert res["good"]["aurc_hi"] < res["bad"]["aurc_lo"]  # a clearly better score: disjoint intervals
    assert F.evaluate_source(src, conf, prob, n_bootstrap=100, seed=0) == res  # seeded
    assert set(F.evaluate_source(src, conf, prob, n_bootstrap=0)["good"]) == set(FAILURE_METRICS)


def test_new_class_source_drops_misclassified_id_rows():
    """fd-shifts' new-class protocol: ID rows that were wrong leave the evaluation; OOD rows all fail."""
    rng = np.random.default_rng(6)
    n_id, n_ood = 80, 40
    correct_id = rng.random(n_id) < 0.9
    correct = np.r_[correct_id, np.zeros(n_ood, bool)]
    is_ood = np.r_[np.zeros(n_id, bool), np.ones(n_ood, bool)]
    conf = {"s": rng.normal(size=n_id + n_ood) + 2 * ~is_ood}
    prob = {"s": 1 / (1 + np.exp(-conf["s"]))}
    src = F.FailureSource("new-class/x", "new-class", np.arange(n_id + n_ood), correct, strata=is_ood,
                          exclude=~is_ood & ~correct)
    res = F.evaluate_source(src, conf, prob, n_bootstrap=20, seed=1)
    keep = ~(~is_ood & ~correct)
    assert res["s"]["aurc"] == pytest.approx(failure_metrics(conf["s"][keep], correct[keep], prob["s"][keep])["aurc"])
    table = F.failure_table([src], conf, prob, n_bootstrap=5)
    model = table[table.method == "model"].set_index("metric").value
    assert model["n"] == keep.sum() and model["acc"] == pytest.approx(correct_id.sum() / keep.sum())


def test_failure_table_rows():
    correct, conf, prob = _source_data(n=200)
    sources = [F.FailureSource("iid", "iid", np.arange(100), correct[:100]),
               F.FailureSource("corruption/c", "corruption", np.arange(100, 200), correct[100:])]
    table = F.failure_table(sources, conf, prob, n_bootstrap=10, seed=2)
    assert list(table.columns) == ["task", "method", "dataset", "metric", "value"] and set(table.task) == {"failure"}
    assert list(table.dataset.drop_duplicates()) == ["iid", "corruption/c"]
    per = table[(table.method == "good") & (table.dataset == "corruption/c")].set_index("metric").value
    assert set(per.index) == {*FAILURE_METRICS, *(f"{k}_{s}" for k in FAILURE_METRICS for s in ("lo", "hi"))}
    assert per["aurc"] == pytest.approx(failure_metrics(conf["good"][100:], correct[100:])["aurc"])

    from oodlib.reporting.tables import failure_markdown, results_markdown

    md = failure_markdown(table)
    assert "#### iid — N = 100" in md and "#### corruption/c" in md
    row = next(line for line in md.splitlines() if line.startswith("| good |"))
    assert row.startswith(f"| good | {1000 * table[(table.method == 'good') & (table.dataset == 'iid') & (table.metric == 'aurc')].value.item():.2f} [")
    assert "Failure detection" in results_markdown(pd.concat([table], ignore_index=True))


def test_rc_plot_is_written(tmp_path):
    from oodlib.metrics import rc_curve
    from oodlib.reporting.failure import plot_risk_coverage

    correct, conf, _ = _source_data(n=200)
    path = plot_risk_coverage({m: rc_curve(v, correct) for m, v in conf.items()}, tmp_path / "rc.png", title="t",
                              accuracy=correct.mean(), dashed=("bad",))
    assert path.stat().st_size > 5000
