"""Drift tests: same distribution → large p, shifted → small p, seeded."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp

from oodlib.verdicts import classifier_drift_test, ks_drift_test

N_PERM = 50


def _data(shift: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(300, 8))
    inc = rng.normal(size=(100, 8))
    inc[:, :2] += shift
    return ref, inc


def test_c2st_same_distribution_large_p():
    res = classifier_drift_test(*_data(0.0), n_permutations=N_PERM, seed=0)
    assert res.test == "c2st" and res.p_value > 0.2 and abs(res.statistic - 0.5) < 0.1
    assert (res.n_reference, res.n_incoming) == (300, 100)


def test_c2st_shift_small_p():
    res = classifier_drift_test(*_data(0.8), n_permutations=N_PERM, seed=0)
    assert res.statistic > 0.7
    assert res.p_value == pytest.approx(1 / (N_PERM + 1))  # no permutation reaches the real AUC


def test_c2st_wide_features_are_projected_without_losing_the_shift():
    rng = np.random.default_rng(3)
    ref, inc = rng.normal(size=(200, 512)), rng.normal(size=(100, 512))
    inc[:, :4] += 1.0  # a shift in 4 of 512 dimensions
    shifted = classifier_drift_test(ref, inc, n_permutations=N_PERM, max_dims=16)
    assert shifted.p_value == pytest.approx(1 / (N_PERM + 1)) and shifted.statistic > 0.7
    same = classifier_drift_test(ref, rng.normal(size=(100, 512)), n_permutations=N_PERM, max_dims=16)
    assert same.p_value > 0.05


def test_c2st_seeded_and_subsampled():
    ref, inc = _data(0.3)
    a = classifier_drift_test(ref, inc, max_rows=80, n_permutations=20, seed=1)
    assert a == classifier_drift_test(ref, inc, max_rows=80, n_permutations=20, seed=1)
    assert a == classifier_drift_test(ref, inc, max_rows=80, n_permutations=20, seed=1, n_jobs=2)  # any n_jobs
    assert (a.n_reference, a.n_incoming) == (80, 80)


def test_c2st_input_checks():
    ref, inc = _data(0.0)
    with pytest.raises(ValueError, match="features"):
        classifier_drift_test(ref, inc[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        classifier_drift_test(ref, inc[:1])


def test_ks():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=500)
    same = ks_drift_test(ref, rng.normal(size=120))
    moved = ks_drift_test(ref, rng.normal(0.6, 1, size=120))
    assert same.test == "ks" and same.p_value > 0.05 and moved.p_value < 1e-3
    inc = rng.normal(size=50)
    assert ks_drift_test(ref, inc).p_value == ks_2samp(ref, inc).pvalue
    with pytest.raises(ValueError):
        ks_drift_test(ref, [])
