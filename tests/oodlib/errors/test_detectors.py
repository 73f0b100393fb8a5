"""Error detectors, fusion export, evaluation tables, and the digits end-to-end check."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodlib.errors import (
    ERROR_DETECTORS,
    FUSION_KINDS,
    ConductanceErrorDetector,
    ErrorDetector,
    FusionDetector,
    auroc_vs_mutants,
    error_table,
    fit_and_evaluate,
    group_split,
    lcr_table,
    to_long_metrics,
)
from oodlib.estimator import NotFittedError
from oodlib.reporting.errors import plot_auroc_vs_mutants


def _synthetic(n, k=20, frac_wrong=0.1, seed=0):
    """Conductance-like vectors where wrong rows are shifted along a hidden direction."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < frac_wrong
    x = rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.1, 10, k).astype(np.float32)
    x[wrong, :3] += 2.5 * x[:, :3].std(0)
    return x, wrong


def test_conductance_detector_learns_and_round_trips():
    x, w = _synthetic(600)
    xv, wv = _synthetic(400, seed=1)
    xt, wt = _synthetic(400, seed=2)
    det = ConductanceErrorDetector(epochs=12, seed=0).fit(x, w, xv, wv)
    risk = det.risk(xt)
    assert risk.dtype == np.float32 and risk.shape == (400,) and ((risk >= 0) & (risk <= 1)).all()
    assert roc_auc_score(wt, risk) > 0.95
    assert det.best_val_auroc_ > 0.95
    state = det.state_dict()
    w = det.weights_
    assert w["w0"].shape == (200, 20) and w["w1"].shape == (200, 200) and w["w2"].shape == (1, 200)
    assert state["weights_.w0"].dtype == np.float32 and set(state) >= {"mean_", "std_", "best_val_auroc_"}
    again = ConductanceErrorDetector().load_state_dict({k: v.copy() for k, v in state.items()})
    np.testing.assert_array_equal(again.risk(xt), risk)
    with pytest.raises(ValueError, match="both correct and wrong"):
        ConductanceErrorDetector().fit(x, np.zeros(len(x), bool))


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_fusion_exported_arrays_equal_scikit_learn(kind):
    rng = np.random.default_rng(0)
    wrong = rng.random(600) < 0.2
    z = np.column_stack([np.clip(rng.normal(0.1 + 0.3 * wrong, 0.15), 0, 1), rng.beta(2 + 4 * wrong, 4)])
    fus = FusionDetector(kind, seed=0).fit(z, wrong)
    zt = np.column_stack([rng.random(300), rng.random(300)])
    zs = (zt - fus.model_["mean"]) / fus.model_["std"]
    np.testing.assert_allclose(fus.risk(zt), fus._sklearn.predict_proba(zs)[:, 1], rtol=1e-5, atol=1e-6)
    again = FusionDetector(kind).load_state_dict(fus.state_dict())
    np.testing.assert_array_equal(again.risk(zt), fus.risk(zt))
    assert not hasattr(again, "_sklearn")  # in memory only, never part of the state
    assert roc_auc_score(wrong, fus.risk(z)) > 0.8


def _fusion_data(seed=0):
    rng = np.random.default_rng(seed)
    wrong = rng.random(400) < 0.2
    z = np.column_stack([np.clip(rng.normal(0.1 + 0.3 * wrong, 0.15), 0, 1), rng.beta(2 + 4 * wrong, 4)])
    return z, wrong


def test_registry_and_contract_variants():
    assert ERROR_DETECTORS == {"conductance": ConductanceErrorDetector, "fusion": FusionDetector}
    assert ConductanceErrorDetector.contract_variants() == [{}]
    assert FusionDetector.contract_variants() == [{"kind": k} for k in FUSION_KINDS]
    assert all(issubclass(c, ErrorDetector) for c in ERROR_DETECTORS.values())
    det = ConductanceErrorDetector(hidden=[8, 4], device="cpu")
    assert det.hidden == (8, 4) and det.params()["hidden"] == [8, 4] and det.params()["device"] == "cpu"


@pytest.mark.parametrize("cls, kwargs", [(ConductanceErrorDetector, {})] + [(FusionDetector, {"kind": k}) for k in FUSION_KINDS])
def test_risk_before_fit_raises_not_fitted(cls, kwargs):
    det = cls(**kwargs)
    assert not det.is_fitted and not det.fitted_attributes()
    with pytest.raises(NotFittedError):
        det.risk(np.zeros((3, 2), np.float32))
    with pytest.raises(NotFittedError):
        det.state_dict()


def test_conductance_detector_save_load_round_trip(tmp_path):
    x, w = _synthetic(300)
    xv, wv = _synthetic(200, seed=1)
    det = ConductanceErrorDetector(hidden=[16, 8], epochs=4, seed=3).fit(x, w, xv, wv)
    path = det.save(tmp_path / "conductance.safetensors")
    again = ConductanceErrorDetector.load(path)
    assert again.params() == det.params() and again.hidden == (16, 8)
    assert again.best_val_auroc_ == det.best_val_auroc_
    np.testing.assert_array_equal(again.risk(xv), det.risk(xv))
    with pytest.raises(ValueError, match="not a FusionDetector"):
        FusionDetector.load(path)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_fusion_save_load_round_trip(kind, tmp_path):
    z, wrong = _fusion_data()
    fus = FusionDetector(kind, seed=1).fit(z, wrong)
    again = FusionDetector.load(fus.save(tmp_path / f"fusion_{kind}.safetensors"))
    assert again.params() == {"kind": kind, "seed": 1}
    zt = np.random.default_rng(5).random((250, 2))
    np.testing.assert_array_equal(again.risk(zt), fus.risk(zt))


def test_error_table_against_hand_computed_values():
    wrong_val = np.array([0, 0, 0, 0, 1, 1], bool)
    risk_val = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.9])
    wrong_test = np.array([0, 0, 1, 1], bool)
    risk_test = np.array([0.5, 0.65, 0.62, 0.1])
    t = error_table({"m": (risk_val, risk_test)}, wrong_val, wrong_test, target_recall_correct=0.75).iloc[0]
    # val: thresholds 0.6 → recall_correct 3/4, recall_wrong 2/2; 0.7 → 1.0 / 0.5; gap 0.25 vs 0.5
    assert t["threshold"] == 0.6
    assert (t["val_recall_correct"], t["val_recall_wrong"]) == (0.75, 1.0)
    assert (t["test_recall_correct"], t["test_recall_wrong"]) == (0.5, 0.5)
    assert t["val_auroc"] == pytest.approx(7 / 8) and t["test_auroc"] == pytest.approx(1 / 4)
    # recall of correct ≥ 0.75 on val: first at t = 0.7 (3 of 4 correct risks below it)
    assert t["threshold_at_target"] == 0.7
    assert (t["val_recall_correct_at_target"], t["val_recall_wrong_at_target"]) == (0.75, 0.5)
    assert (t["test_recall_correct_at_target"], t["test_recall_wrong_at_target"]) == (1.0, 0.0)
    long = to_long_metrics(error_table({"m": (risk_val, risk_test)}, wrong_val, wrong_test), "digits-c")
    assert set(long.columns) == {"task", "method", "dataset", "metric", "value"} and (long["task"] == "error").all()
    assert "val_auroc" in set(long["metric"]) and not long["metric"].str.startswith("threshold").any()


def test_lcr_table_and_auroc_vs_mutants(tmp_path):
    lcr = np.array([0.0, 0.1, 0.2, 0.5, 0.7])
    wrong = np.array([0, 0, 0, 1, 1], bool)
    row = lcr_table([("NAI", 0.002, lcr, wrong)]).iloc[0]
    assert row["correct_mean"] == pytest.approx(0.1) and row["wrong_mean"] == pytest.approx(0.6)
    assert row["lcr_difference"] == pytest.approx((0.6 - 0.1) - (0.1 + np.std([0, 0.1, 0.2])))
    flips = np.array([[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], bool)
    curve = auroc_vs_mutants(flips, wrong, counts=[1, 2, 4])
    assert curve["auroc"].iloc[-1] == pytest.approx(roc_auc_score(wrong, flips.mean(1)))
    assert curve["auroc"].iloc[0] == pytest.approx(roc_auc_score(wrong, flips[:, 0]))
    path = plot_auroc_vs_mutants({"NAI 0.2%": curve}, tmp_path / "fig4.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_split_keeps_groups_together():
    groups = np.repeat(np.arange(4000), 3)
    split = group_split(groups, (0.5, 0.25, 0.25), seed=1)
    by_group = split.reshape(-1, 3)
    assert (by_group == by_group[:, :1]).all()  # a group's rows share one split
    share = {s: float((by_group[:, 0] == s).mean()) for s in ("fit", "val", "test")}
    for s, f in zip(("fit", "val", "test"), (0.5, 0.25, 0.25)):  # binomial sd ≤ 0.008 at 4000 groups
        assert abs(share[s] - f) < 0.03, share
    # a group's split depends on (seed, group) only: dropping other groups or shuffling rows keeps it
    some = np.arange(0, 4000, 7)
    np.testing.assert_array_equal(group_split(some, (0.5, 0.25, 0.25), seed=1), by_group[some, 0])
    assert (group_split(np.array(["a", "b", "a"])) == group_split(np.array(["b", "a", "a"]))[[1, 0, 2]]).all()
    assert not np.array_equal(split, group_split(groups, seed=2))
    assert set(group_split(groups, (0.0, 0.5, 0.5))) == {"val", "test"}


@pytest.mark.slow
def test_end_to_end_digits_conductance_detects_errors(digits_model, digits_inputs, digits_sets):
    """Conductance → detector, fitted on ID train ∪ half of the digits-c source images, evaluated
    on digits-c images whose source images the detector never saw (plus LCR and fusion)."""
    import torch

    from oodlib.errors.conductance import conductance_forward
    from oodlib.errors.lcr import label_change_rate
    from oodlib.errors.mutants import generate_mutants

    xc, yc = digits_inputs[("digits-c", "test")]
    src = np.array([i.rsplit("/", 1)[1] for i in digits_sets[("digits-c", "test")].image_ids])
    keep = np.isin(src, np.unique(src)[::3])  # ~96 source images × 12 corruptions
    xc, yc, src = xc[keep], yc[keep], src[keep]
    xtr, ytr = digits_inputs[("digits", "train")]
    xtr, ytr = xtr[::3], ytr[::3]
    split = group_split(src, (0.5, 0.25, 0.25), seed=0)

    x_all = torch.cat([xtr, xc])
    res = conductance_forward(digits_model, x_all, n_steps=5)
    cond, wrong = res.conductance.numpy(), res.target.numpy() != np.r_[ytr, yc]
    xv, yv = digits_inputs[("digits", "val")]
    ms = generate_mutants(digits_model, xv[:96], yv[:96], "NAI", 0.02, n_accepted=6, max_tries=80)
    lcr = label_change_rate(digits_model, x_all, ms.patches(digits_model), preds=res.target).lcr
    part = np.r_[np.full(len(xtr), "fit"), split]
    out = fit_and_evaluate(
        {s: cond[part == s] for s in ("fit", "val", "test")},
        {s: lcr[part == s] for s in ("fit", "val", "test")},
        {s: wrong[part == s] for s in ("fit", "val", "test")},
        epochs=30,
    )
    t = out.table.set_index("method")
    assert list(t.index) == ["conductance", "lcr", "fusion_nn", "fusion_rf", "fusion_lda", "fusion_qda"]
    assert t.loc["conductance", "test_auroc"] > 0.8
    assert t.loc["conductance", "val_recall_correct"] > 0.7 and t.loc["conductance", "test_recall_wrong"] > 0.6
    assert t.loc["fusion_lda", "test_auroc"] > 0.75
