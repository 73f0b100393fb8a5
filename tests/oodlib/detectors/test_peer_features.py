"""Feature-space peer detectors (NCI, fDBD, NNGuide, ViM, Residual, RMDS, SHE, GMM, pNML): equal to
pytorch-ood 0.4 on the same tensors (up to the stated exact relation), to transcriptions of
OpenOOD's postprocessors, and to hand-computed values."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import sklearn.covariance
import torch
from pytorch_ood.detector import GMM as PoodGMM
from pytorch_ood.detector import NCI as PoodNCI
from pytorch_ood.detector import PNML as PoodPNML
from pytorch_ood.detector import RMD
from pytorch_ood.detector import SHE as PoodSHE
from pytorch_ood.detector import NNGuide as PoodNNGuide
from pytorch_ood.detector import ViM as PoodViM
from pytorch_ood.detector import fDBD
from scipy.special import logsumexp

from oodlib.detectors import Head
from oodlib.detectors.fdbd import FDBD
from oodlib.detectors.gmm import GMM
from oodlib.detectors.nci import NCI
from oodlib.detectors.nnguide import NNGuide
from oodlib.detectors.pnml import PNML
from oodlib.detectors.rmds import RMDS
from oodlib.detectors.she import SHE, class_list
from oodlib.detectors.vim import Residual, ViM, vim_dim
from oodlib.sampling import unit_hash
from tests.oodlib.detectors.peer_data import inputs, linear, problem, separable, t

C, D = 6, 16


@pytest.fixture(scope="module")
def toy():
    return problem(5, n_classes=C, dim=D)


def po(x) -> np.ndarray:
    return x.detach().numpy()


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_matches_pytorch_ood_and_openood(toy, alpha):
    h, y, head, test = toy
    ours = NCI(alpha=alpha).fit(h, y, head).score(inputs(test, head))
    pood = PoodNCI(None, linear(head), alpha=alpha).fit_features(t(h))
    np.testing.assert_allclose(ours, -po(pood.predict_features(t(test))), rtol=1e-5, atol=1e-6)
    # OpenOOD: Σ w[ŷ]·(f − μ) / ‖f − μ‖ + α‖f‖₁
    mu = h.mean(0)
    pred = head.logits(test).argmax(1)
    oo = (head.W[pred] * (test - mu)).sum(1) / np.linalg.norm(test - mu, axis=1) + alpha * np.abs(test).sum(1)
    np.testing.assert_allclose(ours, oo, rtol=1e-5, atol=1e-6)


def test_nci_hand():
    # μ = 0 (rows ±e₁); h = (3, 4): predicted class 0 with w₀ = (1, 0): cos part = 3/5, ‖h‖₁ = 7
    head = Head(np.array([[1, 0], [0, -1]], np.float32), np.zeros(2, np.float32))
    det = NCI(alpha=0.1).fit(np.array([[1, 0], [-1, 0]], np.float32), np.array([0, 1]), head)
    assert det.score(inputs(np.array([[3, 4]], np.float32), head))[0] == pytest.approx(0.6 + 0.7, rel=1e-6)


def test_fdbd_matches_pytorch_ood_and_openood(toy):
    h, y, head, test = toy
    ours = FDBD().fit(h, y, head)
    pood = fDBD(None, linear(head)).fit_features(t(h))
    # pytorch-ood averages over the C − 1 boundaries and negates
    np.testing.assert_allclose(ours.score(inputs(test, head)), -(C - 1) * po(pood.predict_features(t(test))), rtol=1e-5)
    # OpenOOD, both normalizers
    W = head.W.astype(np.float64)
    denom = np.stack([np.where(np.arange(C) == p, 1.0, np.linalg.norm(W - W[p], axis=1)) for p in range(C)])
    z = head.logits(test)
    pred = z.argmax(1)
    boundary = (np.abs(z - z.max(1, keepdims=True)) / denom[pred]).sum(1)
    np.testing.assert_allclose(ours.score(inputs(test, head)), boundary / np.linalg.norm(test - h.mean(0), axis=1), rtol=1e-5)
    by_norm = FDBD(distance_as_normalizer=False).fit(h, y, head).score(inputs(test, head))
    np.testing.assert_allclose(by_norm, boundary / np.linalg.norm(test, axis=1), rtol=1e-5)


def test_fdbd_hand():
    # two classes, boundary x₁ = x₂; h = (3, 1) lies √2 from it; μ = (0, 0) → score √2 / ‖h‖
    head = Head(np.array([[1, 0], [0, 1]], np.float32), np.zeros(2, np.float32))
    det = FDBD().fit(np.array([[1, 0], [-1, 0]], np.float32), np.array([0, 1]), head)
    assert det.score(inputs(np.array([[3, 1]], np.float32), head))[0] == pytest.approx(np.sqrt(2) / np.sqrt(10), rel=1e-6)


def test_nnguide_matches_pytorch_ood_and_openood(toy):
    h, y, head, test = toy
    ours = NNGuide(k=5, alpha=1.0).fit(h, y, head).score(inputs(test, head))
    pood = PoodNNGuide(None, linear(head), k=5).fit_features(t(h), t(y))
    np.testing.assert_allclose(ours, -po(pood.predict_features(t(test))), rtol=1e-5)

    def normalizer(x):  # OpenOOD's, +1e-10 after the division
        return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10

    bank = normalizer(h) * logsumexp(head.logits(h), axis=-1)[:, None]
    index = faiss.IndexFlatIP(D)
    index.add(np.ascontiguousarray(bank, np.float32))
    sims, _ = index.search(np.ascontiguousarray(normalizer(test), np.float32), 5)
    np.testing.assert_allclose(ours, sims.mean(1) * logsumexp(head.logits(test), axis=-1), rtol=1e-5)


def test_nnguide_bank_is_a_seeded_subsample(toy):
    h, y, head, test = toy
    det = NNGuide(k=5, alpha=0.1, seed=3).fit(h, y, head)
    # the rows whose id hash (seed 3) is below 0.1 (ids: the row numbers without image ids)
    rows = np.flatnonzero(unit_hash([str(i) for i in range(len(h))], 3) < 0.1)
    assert len(det.bank_) == len(rows) and 0.5 * 0.1 * len(h) < len(rows) < 1.5 * 0.1 * len(h)
    same = NNGuide(k=5, alpha=1.0).fit(h[rows], y[rows], head)
    np.testing.assert_array_equal(det.score(inputs(test, head)), same.score(inputs(test, head)))
    assert len(NNGuide(k=50, alpha=0.01).fit(h, y, head).bank_) == 50  # at least k rows


def test_nnguide_hand():
    # bank of one row ĥ = (1, 0) with energy log 2 (two zero logits); h = (2, 2): cos 1/√2, E = log 2
    head = Head(np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
    det = NNGuide(k=1, alpha=1.0).fit(np.array([[5, 0]], np.float32), np.zeros(1, int), head)
    expected = np.log(2) * np.log(2) / np.sqrt(2)
    assert det.score(inputs(np.array([[2, 2]], np.float32), head))[0] == pytest.approx(expected, rel=1e-6)


def test_vim_matches_pytorch_ood_and_openood(toy):
    h, y, head, test = toy
    dim = 6
    ours = ViM(dim=dim).fit(h, y, head)
    pood = PoodViM(None, d=dim, w=t(head.W), b=t(head.b)).fit_features(t(h), t(y))
    assert ours.alpha_ == pytest.approx(pood.alpha, rel=1e-5)
    score = ours.score(inputs(test, head))
    np.testing.assert_allclose(score, -po(pood.predict_features(t(test))), rtol=1e-5)
    # OpenOOD's VIMPostprocessor (np.linalg.eig, EmpiricalCovariance(assume_centered=True))
    w, b = head.W.astype(np.float64), head.b.astype(np.float64)
    u = -np.matmul(np.linalg.pinv(w), b)
    ec = sklearn.covariance.EmpiricalCovariance(assume_centered=True).fit(h - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    alpha = (h @ w.T + b).max(axis=-1).mean() / np.linalg.norm((h - u) @ ns, axis=-1).mean()
    oo = logsumexp(test @ w.T + b, axis=-1) - np.linalg.norm((test - u) @ ns, axis=-1) * alpha
    np.testing.assert_allclose(score, oo, rtol=1e-5)
    assert [vim_dim(n) for n in (2048, 1024, 768, 342, 64)] == [1000, 512, 512, 171, 32]


def test_residual_matches_openood_and_hand(toy):
    h, y, head, test = toy
    val = h[::2]  # OpenOOD fits the residual's subspace on ID val
    det = Residual(dim=10).fit(val, y[::2], head)
    w, b = head.W.astype(np.float64), head.b.astype(np.float64)
    u = -np.matmul(np.linalg.pinv(w), b)
    ec = sklearn.covariance.EmpiricalCovariance(assume_centered=True).fit(val - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[10:]]).T)
    np.testing.assert_allclose(det.score(inputs(test, head)), -np.linalg.norm((test - u) @ ns, axis=-1), rtol=1e-5)
    assert Residual.fit_split == "val"
    # hand: val rows spread along x and y only, u = 0 (zero bias): the residual is |z-coordinate|
    head3 = Head(np.eye(3, dtype=np.float32), np.zeros(3, np.float32))
    rows = np.array([[3, 0, 0], [-3, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 0.1], [0, 0, -0.1]], np.float32)
    res = Residual(dim=2).fit(rows, np.zeros(6, int), head3)
    np.testing.assert_allclose(res.score(inputs(np.array([[5, -2, 0.5]], np.float32), head3)), [-0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="principal dimension"):
        Residual(dim=3).fit(rows, np.zeros(6, int), head3)


def test_rmds_is_pytorch_ood_times_minus_n_and_matches_openood(toy):
    h, y, head, test = toy
    det = RMDS().fit(h, y, head)
    score = det.score(inputs(test, head))
    # pytorch-ood: unnormalised covariance sums (+1e-6·I): d's scaled by 1/N, and min(d_k − d₀).
    # Its buffers take torch's default dtype: float64 here, so that float32 rounding in its
    # difference of two quadratic forms does not hide the relation
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pood = RMD(None).fit_features(t(h.astype(np.float64)), t(y))
        theirs = po(pood.predict_features(t(test.astype(np.float64))))
    finally:
        torch.set_default_dtype(default)
    np.testing.assert_allclose(score, -len(h) * theirs, rtol=1e-5)
    # OpenOOD's RMDSPostprocessor
    mean = np.stack([h[y == c].mean(0) for c in range(C)]).astype(np.float64)
    centred = np.concatenate([h[y == c] - mean[c] for c in range(C)])
    prec = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    whole = h.mean(0)
    prec0 = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(h - whole).precision_
    x0 = test - whole
    background = -np.einsum("nd,de,ne->n", x0, prec0, x0)
    cls = np.stack([-np.einsum("nd,de,ne->n", test - mean[c], prec, test - mean[c]) - background for c in range(C)], 1)
    np.testing.assert_allclose(score, cls.max(1), rtol=1e-5, atol=1e-4)


def test_rmds_hand():
    """One-dimensional: classes at ±1 with unit within-class variance; all rows have mean 0 and
    variance 2. At h = 1: d₀ = 1/2, d₊ = 0 → score 1/2."""
    h = np.array([[0.0], [2.0], [-2.0], [0.0]], np.float32)
    y = np.array([0, 0, 1, 1])
    head = Head(np.ones((2, 1), np.float32), np.zeros(2, np.float32))
    det = RMDS().fit(h, y, head)
    assert det.score(inputs(np.array([[1.0]], np.float32), head))[0] == pytest.approx(0.5, rel=1e-6)


def test_she_matches_pytorch_ood_and_openood():
    h, y, head, test = separable(4, n_classes=C, dim=D)
    det = SHE().fit(h, y, head)
    pood = PoodSHE(None, linear(head)).fit_features(t(h), t(y))
    score = det.score(inputs(test, head))
    np.testing.assert_allclose(score, -po(pood.predict_features(t(test))), rtol=1e-5)
    # OpenOOD: patterns over label = pred; the score is the inner product with the predicted one
    pred_train = head.logits(h).argmax(1)
    patterns = np.stack([h[(y == k) & (pred_train == k)].mean(0) for k in range(C)])
    np.testing.assert_allclose(score, (test * patterns[head.logits(test).argmax(1)]).sum(1), rtol=1e-5)


def test_she_hand_and_fallback(toy):
    # class 0's correct rows (1, 0) and (3, 0) → m₀ = (2, 0); h = (1, 5) predicted 0: score 2
    head = Head(np.array([[1, 0], [-1, 0]], np.float32), np.zeros(2, np.float32))
    h = np.array([[1, 0], [3, 0], [-1, 0], [5, 0]], np.float32)  # the last is labelled 1 but predicted 0
    det = SHE().fit(h, np.array([0, 0, 1, 1]), head)
    np.testing.assert_allclose(det.patterns_, [[2, 0], [-1, 0]])
    assert det.score(inputs(np.array([[1, 5]], np.float32), head))[0] == pytest.approx(2.0)
    with pytest.warns(RuntimeWarning, match=r"classes \[1\] have no correctly classified"):
        fb = SHE().fit(h, np.array([0, 0, 0, 1]), head)  # class 1 only has the wrong row (5, 0)
    np.testing.assert_allclose(fb.patterns_[1], [5, 0])


def test_class_lists_in_messages_stay_short():
    assert class_list(np.array([False, True, True])) == "classes [1, 2]"
    many = np.ones(1000, bool)
    many[[3, 500]] = False  # 998 of 1000, as on an untrained ImageNet head
    assert class_list(many) == "998 of 1000 classes (0, 1, 2, 4, 5, 6, 7, 8, 9, …, 999)"


def test_gmm_matches_pytorch_ood_and_hand(toy):
    h, y, head, test = toy
    ours = GMM().fit(h, y, head).score(inputs(test, head))
    pood = PoodGMM(None).fit_features(t(h), t(y))
    np.testing.assert_allclose(ours, -po(pood.predict_features(t(test))), rtol=1e-5)
    # hand: one class, one dimension, rows ±1 → N(0, 1 + reg); log density at 0 = −½ log 2π
    one = Head(np.ones((1, 1), np.float32), np.zeros(1, np.float32))
    det = GMM(reg=0.0).fit(np.array([[1.0], [-1.0]], np.float32), np.zeros(2, int), one)
    assert det.score(inputs(np.zeros((1, 1), np.float32), one))[0] == pytest.approx(-0.5 * np.log(2 * np.pi), rel=1e-6)


def test_pnml_matches_pytorch_ood_and_hand(toy):
    h, y, head, test = toy
    ours = PNML().fit(h, y, head).score(inputs(test, head))
    pood = PoodPNML(None, linear(head)).fit_features(t(h), t(y))
    np.testing.assert_allclose(ours, -po(pood.predict_features(t(test))), rtol=1e-5)
    # hand: κ = 0 (x ⟂ every training row) → every genie term is p/(p + 1 − p) = p: regret 0;
    # uniform p and κ = 1/2 → each term (1/2)/(1/2 + (1/2)^{3/2}), regret log(2·term)/log 2
    head2 = Head(np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
    det = PNML().fit(np.array([[1, 0]], np.float32), np.zeros(1, int), head2)
    got = det.score(inputs(np.array([[0, 3], [2, 0]], np.float32), head2))
    term = 0.5 / (0.5 + 0.5**1.5)
    np.testing.assert_allclose(got, [0.0, -np.log(2 * term) / np.log(2)], atol=1e-7)
