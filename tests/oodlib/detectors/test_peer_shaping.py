"""Activation-shaping peer detectors (ASH-P/B/S, SCALE, LTS, VRA): equal to pytorch-ood 0.4 on the
same tensors (pooled features as B×D×1×1 maps), to transcriptions of OpenOOD's networks and
postprocessors, and to hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import ASH as PoodASH
from pytorch_ood.detector import LTS as PoodLTS
from pytorch_ood.detector import SCALE as PoodSCALE
from pytorch_ood.detector import VRA as PoodVRA
from scipy.special import logsumexp

from oodlib.detectors import Head
from oodlib.detectors.ash import ASHB, ASHP, ASHS, keep_count
from oodlib.detectors.scale import LTS, SCALE
from oodlib.detectors.vra import VRA
from tests.oodlib.detectors.peer_data import inputs, linear, problem, t

ASH = {"ash-p": ASHP, "ash-b": ASHB, "ash-s": ASHS}


@pytest.fixture(scope="module")
def toy():
    return problem(3)


def maps(h: np.ndarray) -> torch.Tensor:
    return t(h).view(len(h), -1, 1, 1)


def on_maps(head: Head):
    lin = linear(head)
    return lambda x: lin(x.flatten(1))


def fitted(cls, toy, **params):
    h, y, head, _ = toy
    return cls(**params).fit(h, y, head)


@pytest.mark.parametrize("variant", sorted(ASH))
@pytest.mark.parametrize("percentile", [65, 90])
def test_ash_matches_pytorch_ood(toy, variant, percentile):
    _, _, head, test = toy
    ours = fitted(ASH[variant], toy, percentile=percentile).score(inputs(test, head))
    pood = PoodASH(lambda x: x, on_maps(head), variant=variant, percentile=percentile / 100)
    np.testing.assert_allclose(ours, -pood.predict_feature_maps(maps(test)).numpy(), rtol=1e-5)


def test_ash_b_matches_openood_ashnet(toy):
    """OpenOOD's ``ASHNet.forward_threshold`` (ash_b on the pooled feature as B×C×1×1) + energy."""
    _, _, head, test = toy
    x = maps(test).clone()
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * 90 / 100.0))
    flat = x.view((x.shape[0], -1))
    v, i = torch.topk(flat, k, dim=1)
    flat.zero_().scatter_(dim=1, index=i, src=(s1 / k).unsqueeze(1).expand(v.shape))
    with torch.no_grad():
        energy = torch.logsumexp(linear(head)(x.view(x.shape[0], -1)), dim=1).numpy()
    np.testing.assert_allclose(fitted(ASHB, toy).score(inputs(test, head)), energy, rtol=1e-5)


def test_ash_and_scale_hand():
    """h = (4, 3, 2, 1), P = 50 → k = 2, head = identity: ASH-P keeps (4, 3, 0, 0), ASH-B fills
    (5, 5, 0, 0), ASH-S scales (4, 3, 0, 0) by e^{10/7}; SCALE scales all of h by e^{10/7}."""
    h = np.array([[4.0, 3.0, 2.0, 1.0]], np.float32)
    head = Head(np.eye(4, dtype=np.float32), np.zeros(4, np.float32))
    assert keep_count(4, 50) == 2 and keep_count(2048, 90) == 205 and keep_count(10, 65) == 4  # round half to even
    r = np.exp(10 / 7)
    cases = {ASHP: [4, 3, 0, 0], ASHB: [5, 5, 0, 0], ASHS: [4 * r, 3 * r, 0, 0], SCALE: [4 * r, 3 * r, 2 * r, r]}
    for cls, shaped in cases.items():
        det = cls(percentile=50).fit(h, np.zeros(1, int), head)
        assert det.score(inputs(h, head))[0] == pytest.approx(logsumexp(shaped), rel=1e-6), cls.name
    # LTS: (Σh / Σtop-2)² = (10/7)² times the logits
    assert LTS(percentile=50).score(inputs(h, head))[0] == pytest.approx(logsumexp(h[0] * (10 / 7) ** 2), rel=1e-6)


@pytest.mark.parametrize("percentile", [65, 85])
def test_scale_matches_pytorch_ood_and_openood(toy, percentile):
    _, _, head, test = toy
    ours = fitted(SCALE, toy, percentile=percentile).score(inputs(test, head))
    pood = PoodSCALE(lambda x: x, on_maps(head), percentile=percentile / 100)
    np.testing.assert_allclose(ours, -pood.predict_feature_maps(maps(test)).numpy(), rtol=1e-5)
    # OpenOOD's scale_net.scale: s2 = the sum after pruning, the unpruned input scaled
    x = maps(test)
    n = x.shape[1]
    v, _ = torch.topk(x.view(len(x), -1), n - int(np.round(n * percentile / 100.0)), dim=1)
    scaled = x * torch.exp(x.sum(dim=[1, 2, 3]) / v.sum(1))[:, None, None, None]
    with torch.no_grad():
        energy = torch.logsumexp(linear(head)(scaled.flatten(1)), 1).numpy()
    np.testing.assert_allclose(ours, energy, rtol=1e-5)


@pytest.mark.parametrize("percentile", [75, 95])
def test_lts_matches_pytorch_ood(toy, percentile):
    _, _, head, test = toy
    test = test - 0.3  # some negative entries: LTS measures the mass of relu(h)
    ours = LTS(percentile=percentile).score(inputs(test, head))
    pood = PoodLTS(None, linear(head), p=1 - percentile / 100)
    np.testing.assert_allclose(ours, -pood.predict_features(t(test)).numpy(), rtol=1e-5)


def test_vra_matches_openood_transcription(toy):
    h, y, head, test = toy
    det = VRA().fit(h, y, head)
    lo, hi = np.percentile(h.flatten(), 10), np.percentile(h.flatten(), 90)  # OpenOOD's setup
    assert det.lower_ == pytest.approx(lo) and det.upper_ == pytest.approx(hi)
    with torch.no_grad():
        energy = torch.logsumexp(linear(head)(t(test).clip(min=float(lo), max=float(hi))), 1).numpy()
    np.testing.assert_allclose(det.score(inputs(test, head)), energy, rtol=1e-5)
    # hand: one feature, thresholds 1 and 3 from the values 0…4: clip(10) = 3
    one = Head(np.ones((1, 1), np.float32), np.zeros(1, np.float32))
    vals = np.arange(5, dtype=np.float32)[:, None]
    small = VRA(lower=25, upper=75).fit(vals, np.zeros(5, int), one)
    assert (small.lower_, small.upper_) == (1.0, 3.0)
    assert small.score(inputs(np.array([[10.0], [-5.0]], np.float32), one)).tolist() == [3.0, 1.0]


def test_vra_per_feature_matches_pytorch_ood(toy):
    h, y, head, test = toy
    ours = VRA(lower=1, upper=99, per_feature=True).fit(h, y, head).score(inputs(test, head))
    pood = PoodVRA(lambda x: x, on_maps(head), lower_percentile=0.01, upper_percentile=0.99)
    pood.fit_feature_maps(maps(h), t(y))
    np.testing.assert_allclose(ours, -pood.predict_feature_maps(maps(test)).numpy(), rtol=1e-5)
