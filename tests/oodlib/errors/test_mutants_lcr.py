"""Mutation operators, acceptance sampling, batched LCR and the SPRT early stop."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from oodlib.errors.lcr import (
    CORRECT, SPRT, UNDECIDED, WRONG, first_mutated_stage, fit_sprt_tau, forward_stages, label_change_rate,
)
from oodlib.errors.mutants import (
    Mutant,
    MutantSet,
    Patch,
    applied,
    generate_mutants,
    mutable_layers,
    mutant_patches,
    predict,
)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, before):
    """{name: boolean mask of changed entries} for every parameter that changed."""
    now = model.state_dict()
    return {k: (now[k] != v) for k, v in before.items() if not torch.equal(now[k], v)}


def _rows_changed(mask):
    return torch.nonzero(mask.reshape(mask.shape[0], -1).any(1))[:, 0]


def test_nai_negates_rows_and_bias_then_reverts_exactly(digits_model):
    before = _snapshot(digits_model)
    n_neurons = sum(m.weight.shape[0] for m in mutable_layers(digits_model))
    assert n_neurons == 16 + 32 + 64 + 8
    patches = mutant_patches(digits_model, Mutant("NAI", 0.05, 3))
    with applied(patches):
        changed = _changed(digits_model, before)
        now = digits_model.state_dict()
        rows = 0
        for name, mask in changed.items():
            if name.endswith("weight"):
                r = _rows_changed(mask)
                rows += len(r)
                assert torch.equal(now[name][r], -before[name][r])
            else:  # the head bias: entries of the same rows
                r = torch.nonzero(mask)[:, 0]
                assert torch.equal(now[name][r], -before[name][r])
        assert rows == round(0.05 * n_neurons)
    assert not _changed(digits_model, before)


def test_gf_redraws_the_right_number_of_scalars(digits_model):
    before = _snapshot(digits_model)
    total = sum(m.weight.numel() for m in mutable_layers(digits_model))
    with applied(mutant_patches(digits_model, Mutant("GF", 0.01, 0))):
        changed = _changed(digits_model, before)
        assert all(k.endswith("weight") for k in changed)
        assert sum(int(m.sum()) for m in changed.values()) == round(0.01 * total)
    assert not _changed(digits_model, before)


def test_ws_permutes_within_rows(digits_model):
    before = _snapshot(digits_model)
    with applied(mutant_patches(digits_model, Mutant("WS", 0.05, 1))):
        now = digits_model.state_dict()
        changed = _changed(digits_model, before)
        assert all(k.endswith("weight") for k in changed)
        for name, mask in changed.items():
            r = _rows_changed(mask)
            old, new = before[name][r].flatten(1), now[name][r].flatten(1)
            assert torch.equal(old.sort(1).values, new.sort(1).values)


def test_ns_switches_rows_within_layers(digits_model):
    before = _snapshot(digits_model)
    with applied(mutant_patches(digits_model, Mutant("NS", 0.2, 2))):
        now = digits_model.state_dict()
        changed = _changed(digits_model, before)
        # layers with n ≥ 10 neurons switch ⌊0.2·n⌋ rows: 3 of 16, 6 of 32, 12 of 64; the head (8) is skipped
        counts = {k: len(_rows_changed(m)) for k, m in changed.items() if k.endswith("weight")}
        assert sorted(counts.values()) == [3, 6, 12]
        for name in counts:
            r = _rows_changed(changed[name])
            old, new = before[name][r].flatten(1), now[name][r].flatten(1)
            # the switched rows are a permutation of the same rows
            assert sorted(map(tuple, old.tolist())) == sorted(map(tuple, new.tolist()))
    assert not _changed(digits_model, before)
    with pytest.raises(ValueError, match="switches no neurons"):
        mutant_patches(digits_model, Mutant("NS", 0.01, 0))


def test_mutants_are_deterministic_in_the_seed(digits_model):
    a = mutant_patches(digits_model, Mutant("GF", 0.01, 7))
    b = mutant_patches(digits_model, Mutant("GF", 0.01, 7))
    c = mutant_patches(digits_model, Mutant("GF", 0.01, 8))
    assert all(torch.equal(p.index, q.index) and torch.equal(p.values, q.values) for p, q in zip(a, b))
    assert not all(len(p.index) == len(q.index) and torch.equal(p.index, q.index) for p, q in zip(a, c))
    with pytest.raises(ValueError):
        Mutant("XX", 0.1, 0)


@pytest.fixture(scope="module")
def val(digits_inputs):
    x, y = digits_inputs[("digits", "val")]
    return x[:96], y[:96]


def test_acceptance_rule_and_table(digits_model, val):
    x, y = val
    ms = generate_mutants(digits_model, x, y, "NAI", 0.02, n_accepted=4, max_tries=60)
    base = float((predict(digits_model, x).numpy() == y).mean())
    assert ms.original_val_acc == pytest.approx(base)
    t = ms.to_frame()
    assert list(t.columns) == ["operator", "rate", "seed", "val_acc", "accepted"]
    assert ms.n_accepted == 4 and ms.n_rejected == len(t) - 4 and t["accepted"].iloc[-1]
    for row in t.itertuples():  # recompute every mutant's accuracy from its identity
        with applied(mutant_patches(digits_model, Mutant(row.operator, row.rate, row.seed))):
            acc = float((predict(digits_model, x).numpy() == y).mean())
        assert acc == pytest.approx(row.val_acc)
        assert row.accepted == (acc >= 0.9 * base)
    again = MutantSet.from_frame(pd.DataFrame(t.to_dict("list")))
    assert again.mutants == ms.mutants
    with pytest.raises(RuntimeError, match=r"only 0 of 3 mutants accepted after 5 tries \(5 rejected"):
        generate_mutants(digits_model, x, y, "NAI", 0.02, n_accepted=3, max_tries=5, min_relative_acc=1.5)


@pytest.fixture(scope="module")
def lcr_setup(digits_model, digits_inputs):
    x, _ = digits_inputs[("digits-c", "test")]
    x = x[::58][:60]
    mutants = [Mutant("NAI", 0.03, s) for s in range(12)]
    return x, [mutant_patches(digits_model, m) for m in mutants]


def test_flip_matrix_matches_one_image_at_a_time(digits_model, lcr_setup):
    x, patches = lcr_setup
    res = label_change_rate(digits_model, x, patches, batch_size=50)
    preds = predict(digits_model, x)
    idx = [0, 7, 33]
    for m, p in enumerate(patches):
        with applied(p), torch.no_grad():
            for i in idx:
                assert res.flips[i, m] == bool(digits_model(x[i : i + 1]).argmax(1) != preds[i])
    np.testing.assert_allclose(res.lcr, res.flips.mean(1), rtol=1e-6)
    assert (res.used == len(patches)).all() and res.decision is None
    assert res.flips.any()  # the test is not vacuous


def test_sprt_log_ratio_and_post_hoc_decisions():
    s = SPRT(0.2)
    assert s.p0 == pytest.approx(0.18) and s.p1 == pytest.approx(0.22)
    assert s.upper == pytest.approx(np.log(19)) and s.lower == pytest.approx(-np.log(19))
    assert s.log_ratio(3, 10) == pytest.approx(3 * np.log(0.22 / 0.18) + 7 * np.log(0.78 / 0.82))
    rng = np.random.default_rng(0)
    flips = rng.random((40, 150)) < rng.uniform(0, 0.6, (40, 1))
    decision, used = s.decide(flips)
    for i in range(len(flips)):  # naive loop: the rule checked after every mutant
        c, want = 0, (UNDECIDED, flips.shape[1])
        for n in range(1, flips.shape[1] + 1):
            c += flips[i, n - 1]
            r = s.log_ratio(c, n)
            if r >= s.upper or r <= s.lower:
                want = (WRONG if r >= s.upper else CORRECT, n)
                break
        assert (decision[i], used[i]) == want
    # an input that never flips is decided "correct" after ⌈log(19)/−log(0.78/0.82)⌉ mutants
    d, u = s.decide(np.zeros((1, 200), bool))
    assert d[0] == CORRECT and u[0] == int(np.ceil(np.log(19) / -np.log(0.78 / 0.82)))
    with pytest.raises(ValueError):
        SPRT(0.95)


def test_batched_sprt_equals_post_hoc(digits_model, lcr_setup):
    x, patches = lcr_setup
    full = label_change_rate(digits_model, x, patches)
    sprt = SPRT(0.8)  # never-flipping inputs decide "correct" after 4 mutants
    early = label_change_rate(digits_model, x, patches, sprt=sprt)
    decision, used = sprt.decide(full.flips)
    np.testing.assert_array_equal(early.decision, decision)
    np.testing.assert_array_equal(early.used, used)
    c = np.array([full.flips[i, : used[i]].sum() for i in range(len(x))])
    np.testing.assert_allclose(early.lcr, c / used, rtol=1e-6)
    for i in range(len(x)):  # evaluated entries agree with the full run
        np.testing.assert_array_equal(early.flips[i, : used[i]], full.flips[i, : used[i]])
    assert (decision != UNDECIDED).any() and early.used.dtype == np.int16


def test_fit_sprt_tau_closed_forms():
    x = np.array([0.0, 0.1, 0.2, 0.1, 0.0, 0.3])
    m, s = x.mean(), x.std(ddof=1)
    # quantile band: linear interpolation between order statistics 0.2 and 0.3 at rank 0.99·5
    assert fit_sprt_tau(x, 100) == pytest.approx(0.2 + 0.95 * 0.1)
    assert fit_sprt_tau(x, 100, confidence=0.5) == pytest.approx(0.1)
    assert fit_sprt_tau(x, 100, band="mean_ci") == pytest.approx(m + 2.5758293035 * s / np.sqrt(6))
    # floor: one flip in M mutants when nothing flips; cap: p1 = 1.1·τ stays below 1
    assert fit_sprt_tau(np.zeros(5), 50) == pytest.approx(1 / 50)
    tau = fit_sprt_tau(np.ones(5), 100)
    assert tau < 1 / 1.1 and tau == pytest.approx(1 / 1.1) and SPRT(tau).p1 < 1
    with pytest.raises(ValueError, match="unknown band"):
        fit_sprt_tau(x, 100, band="population")



def test_prefix_reuse_equals_full_mutant_forwards(digits_model, lcr_setup):
    """Mutants run from their first mutated stage give the flips of full mutant forwards."""
    x, _ = lcr_setup
    stages = forward_stages(digits_model)
    h = x
    with torch.no_grad():
        for st in stages:
            h = st(h)
        torch.testing.assert_close(h, digits_model(x), rtol=0, atol=0)  # the chain is the forward
    head_only = [Patch(digits_model.head.weight.detach(), torch.tensor([0, 5]), torch.tensor([9.0, -9.0]))]
    assert first_mutated_stage(stages, head_only) == len(stages) - 1
    patches = [mutant_patches(digits_model, Mutant("NAI", 0.02, s)) for s in range(30)] + [head_only]
    starts = {first_mutated_stage(stages, p) for p in patches}
    assert len(starts) >= 3 and max(starts) == len(stages) - 1  # mutants start at several stages
    preds = predict(digits_model, x)
    before = _snapshot(digits_model)
    res = label_change_rate(digits_model, x, patches, preds=preds)
    for k, v in digits_model.state_dict().items():  # every mutant reverted exactly
        assert torch.equal(v, before[k]), k
    want = np.zeros_like(res.flips)
    for m, p in enumerate(patches):
        with applied(p), torch.no_grad():
            want[:, m] = (digits_model(x).argmax(1) != preds).numpy()
    np.testing.assert_array_equal(res.flips, want)
    assert want[:, -1].any()
