"""Logit-based peer detectors (TempScale, Entropy, GEN, KLM, GradNorm, GradUncertainty, OpenMax):
equal to pytorch-ood 0.4 on the same tensors (up to the stated exact relation), to a NumPy/torch
transcription of OpenOOD's postprocessor, and to hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from pytorch_ood.detector import GEN as PoodGEN
from pytorch_ood.detector import Entropy as PoodEntropy
from pytorch_ood.detector import GradNorm as PoodGradNorm
from pytorch_ood.detector import GradUncertainty as PoodGradUncertainty
from pytorch_ood.detector import KLMatching, TemperatureScaling
from pytorch_ood.detector import OpenMax as PoodOpenMax
from scipy.special import softmax
from sklearn.metrics import pairwise_distances_argmin_min

from oodlib.detectors import ScoreInputs, make_detector
from oodlib.detectors.entropy import Entropy
from oodlib.detectors.gen import GEN
from oodlib.detectors.gradnorm import GradNorm, GradUncertainty
from oodlib.detectors.klm import KLM
from oodlib.detectors.openmax import OpenMax, w_score
from oodlib.detectors.tempscale import TempScale
from tests.oodlib.detectors.peer_data import inputs, model, problem, separable, t

C, D = 6, 16


@pytest.fixture(scope="module")
def toy():
    return problem(0, n_classes=C)


def logits_only(z) -> ScoreInputs:
    z = np.asarray(z, np.float32)
    return ScoreInputs(np.ones((len(z), 1), np.float32), z, {})


@pytest.mark.parametrize("name", ["tempscale", "klm", "residual", "vra"])
def test_val_fitted_detectors_declare_it(toy, name):
    det = make_detector(name)
    assert det.fit_split == "val" and "bank" in det.fit_needs  # FIT hands them the ID val rows
    with pytest.raises(ValueError, match="ID val split, which has no rows"):
        det.fit(np.zeros((0, D), np.float32), np.zeros(0, int), toy[2])


def test_tempscale_matches_pytorch_ood_and_openood(toy):
    h, y, head, test = toy
    ours = TempScale(init_temperature=1.0).fit(h, y, head)  # pytorch-ood starts at T = 1
    pood = TemperatureScaling(None).fit_logits(t(head.logits(h)), t(y))
    assert ours.temperature_ == pytest.approx(pood.t.item(), rel=1e-6)
    np.testing.assert_allclose(ours.score(inputs(test, head)), -pood.predict_logits(t(head.logits(test))).detach().numpy(), rtol=1e-5)
    # OpenOOD: T starts at 1.5, CrossEntropyLoss, one LBFGS(lr=0.01, max_iter=50) step
    temperature = torch.nn.Parameter(torch.ones(1) * 1.5)
    logits, labels = t(head.logits(h)), t(y)
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.CrossEntropyLoss()(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    oo = TempScale().fit(h, y, head)
    assert oo.temperature_ == pytest.approx(temperature.item(), rel=1e-6)
    conf = torch.softmax(t(head.logits(test)) / temperature.detach(), 1).max(1).values.numpy()
    np.testing.assert_allclose(oo.score(inputs(test, head)), conf, rtol=1e-5)

    def nll(temp):
        return float(F.cross_entropy(logits / temp, labels))

    assert nll(oo.temperature_) < nll(1.5)  # the step lowers the NLL


def test_entropy_matches_pytorch_ood_and_hand(toy):
    _, _, head, test = toy
    z = head.logits(test)
    np.testing.assert_allclose(Entropy().score(inputs(test, head)), -PoodEntropy.score(t(z)).numpy(), rtol=1e-5)
    # two equal logits: H = log 2; one sure class: H → 0
    np.testing.assert_allclose(Entropy().score(logits_only([[0, 0], [50, -50]])), [-np.log(2), 0.0], atol=1e-12)


@pytest.mark.parametrize("M", [None, 3])
def test_gen_matches_pytorch_ood_and_openood(toy, M):
    _, _, head, test = toy
    z = head.logits(test)
    ours = GEN(gamma=0.1, M=M).score(inputs(test, head))
    # pytorch-ood averages over the M terms and clamps p to [1e-7, 1-1e-7]: equal where it is inactive
    m = C if M is None else M
    p = softmax(z.astype(np.float64), 1)
    unclamped = (np.sort(p, 1)[:, -m:].min(1) > 1e-7) & (p.max(1) < 1 - 1e-7)
    assert unclamped.sum() >= 50
    pood = -m * PoodGEN.score(t(z), gamma=0.1, M=M).numpy()
    np.testing.assert_allclose(ours[unclamped], pood[unclamped], rtol=1e-5)
    # OpenOOD: sort ascending, keep the last M, sum p^γ(1-p)^γ, negate
    probs = torch.softmax(t(z), dim=1)
    top = torch.sort(probs, dim=1)[0][:, -m:]
    np.testing.assert_allclose(ours, -torch.sum(top**0.1 * (1 - top) ** 0.1, dim=1).numpy(), rtol=1e-5)


def test_gen_hand():
    # p = (1/2, 1/2), γ = 1: −(1/4 + 1/4); M = 1 keeps one term
    np.testing.assert_allclose(GEN(gamma=1.0).score(logits_only([[0, 0]])), [-0.5])
    np.testing.assert_allclose(GEN(gamma=1.0, M=1).score(logits_only([[0, 0]])), [-0.25])


def test_klm_matches_pytorch_ood():
    h, y, head, test = separable(2)
    ours = KLM().fit(h, y, head)
    val_logits = t(head.logits(h))
    assert len(np.unique(val_logits.argmax(1))) == head.W.shape[0]  # every class predicted: both keep all templates
    pood = KLMatching(None).fit_logits(val_logits)
    np.testing.assert_allclose(ours.score(inputs(test, head)), -pood.predict_logits(t(head.logits(test))).numpy(), rtol=1e-5, atol=1e-7)


def test_klm_matches_openood_with_an_unpredicted_class(toy):
    h, y, head, test = toy
    pred = head.logits(h).argmax(1)
    val = h[pred != 2]  # no val row is predicted as class 2: OpenOOD gives it a one-hot template
    ours = KLM().fit(val, None, head)
    probs = softmax(head.logits(val).astype(np.float64), 1)
    vpred = probs.argmax(1)
    templates = [probs[vpred == i].mean(0) if (vpred == i).any() else np.eye(C)[i] for i in range(C)]
    p = softmax(head.logits(test).astype(np.float64), 1)
    oo = -pairwise_distances_argmin_min(p, np.array(templates), metric=lambda a, b: scipy.stats.entropy(a, b))[1]
    np.testing.assert_allclose(ours.score(inputs(test, head)), oo, rtol=1e-5)
    np.testing.assert_array_equal(ours.templates_[2], np.eye(C)[2])
    # hand: a row equal to a template has KL 0, the maximum score
    row = np.log(ours.templates_[0])[None]
    assert ours.score(logits_only(row))[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradnorm_is_pytorch_ood_backward_times_minus_c(toy, temperature):
    """Closed form vs pytorch-ood's per-sample backward on the fc weight: PO = −s/C exactly."""
    _, _, head, test = toy
    ours = GradNorm(temperature).score(inputs(test, head))
    pood = PoodGradNorm(model(head), param_filter=lambda n: n == "fc.weight", temperature=temperature).predict(t(test))
    np.testing.assert_allclose(ours, -C * pood.numpy(), rtol=1e-5)


def test_gradnorm_matches_openood_loop_and_hand(toy):
    _, _, head, test = toy
    fc = model(head).fc
    targets = torch.ones((1, C))
    confs = []
    for x in t(test):  # OpenOOD's GradNormPostprocessor.gradnorm
        fc.zero_grad()
        loss = torch.mean(torch.sum(-targets * F.log_softmax(fc(x[None]), dim=-1), dim=-1))
        loss.backward()
        confs.append(torch.sum(torch.abs(fc.weight.grad.data)).numpy())
    np.testing.assert_allclose(GradNorm().score(inputs(test, head)), np.array(confs), rtol=1e-5)
    # hand: z = (0, log 3) → p = (1/4, 3/4), ‖p − u‖₁ = 1/2; h = (1, 2): s = 2·(1/2)·3 = 3
    one = ScoreInputs(np.array([[1.0, 2.0]], np.float32), np.array([[0.0, np.log(3)]], np.float32), {})
    assert GradNorm().score(one)[0] == pytest.approx(3.0, rel=1e-6)
    # GradUncertainty: Cp − 1 = (−1/2, 1/2), ‖·‖² = 1/2, ‖h‖² = 5
    assert GradUncertainty().score(one)[0] == pytest.approx(2.5, rel=1e-6)


def test_graduncertainty_is_minus_pytorch_ood(toy):
    _, _, head, test = toy
    pood = PoodGradUncertainty(model(head), param_filter=lambda n: n == "fc.weight").predict(t(test))
    np.testing.assert_allclose(GradUncertainty().score(inputs(test, head)), -pood.numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def openmax_problem():
    return separable(1)


def test_openmax_matches_pytorch_ood(openmax_problem):
    """Every training row correct (PO centres use all rows, ours the correct ones) and every class
    predicted in the test batch (PO fills the distances of the batch's predicted classes only)."""
    h, y, head, test = openmax_problem
    ours = OpenMax(tailsize=25, alpha=10).fit(h, y, head)
    pood = PoodOpenMax(None, tailsize=25, alpha=10).fit_logits(t(head.logits(h).astype(np.float64)), t(y))
    theirs = pood.predict_logits(t(head.logits(test).astype(np.float64))).numpy()
    np.testing.assert_allclose(ours.score(inputs(test, head)), -theirs, rtol=1e-5, atol=1e-9)


def test_openmax_matches_openood_transcription(openmax_problem):
    """OpenOOD's ``openmax()`` (euclidean, eu_weight unused, one channel) with our Weibull fits."""
    h, y, head, test = openmax_problem
    det = OpenMax().fit(h, y, head)
    n_classes, alpha = head.W.shape[0], 3
    oo = []
    for z in head.logits(test).astype(np.float64):
        ranked = z.argsort()[::-1][:alpha]
        omega = np.zeros(n_classes)
        omega[ranked] = [(alpha + 1 - i) / alpha for i in range(1, alpha + 1)]
        scores, unknown = [], []
        for c in range(n_classes):
            dist = np.linalg.norm(z - det.mav_[c])
            w = w_score(dist, det.weibull_min_[c], det.weibull_c_[c], det.weibull_scale_[c])
            scores.append(z[c] * (1 - w * omega[c]))
            unknown.append(z[c] - scores[-1])
        e, eu = np.exp(scores), np.exp(np.sum(unknown))
        oo.append(-eu / (e.sum() + eu))
    np.testing.assert_allclose(det.score(inputs(test, head)), oo, rtol=1e-6, atol=1e-12)
    # the Weibull: libMR's translated tail, CDF rising from ≈ 0 below the tail to ≈ 1 above it
    d_train = np.linalg.norm(head.logits(h[y == 0]) - det.mav_[0], axis=1)
    lo, hi = w_score(np.array([0.0, d_train.max() * 3]), det.weibull_min_[0], det.weibull_c_[0], det.weibull_scale_[0])
    assert lo < 1e-3 and hi > 0.999
    assert det.weibull_min_[0] == pytest.approx(np.sort(d_train)[-20], rel=1e-5)


def test_openmax_hand_alpha_one():
    """α = 1, a Weibull that says "outlier" (w = 1) for every distance: the top logit moves
    entirely to the unknown class, P(unknown) = e^{z₁}/(e^0 + Σ_{k>1} e^{z_k} + e^{z₁})."""
    det = OpenMax(alpha=1)
    det.mav_ = np.zeros((3, 3))
    det.weibull_min_, det.weibull_c_, det.weibull_scale_ = np.full(3, -1e9), np.ones(3), np.full(3, 1e-9)
    z = np.array([[2.0, 1.0, 0.0]])
    expected = np.exp(2) / (1 + np.exp(1) + np.exp(0) + np.exp(2))
    assert det.score(logits_only(z))[0] == pytest.approx(-expected, rel=1e-6)
