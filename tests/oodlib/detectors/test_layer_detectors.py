"""Detectors on intermediate-layer statistics (:mod:`oodlib.layers`): RankFeat, Gram and multi-layer
Mahalanobis against pytorch-ood 0.4 on the same model and tensors (and RankFeat's fusion against
a transcription of OpenOOD's postprocessor), on a random-weight ResNet-18 at 64 px and on the
trained digits-cnn; the shared pass against the statistics one at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import Gram as PoodGram
from pytorch_ood.detector import MultiMahalanobis as PoodMultiMahalanobis
from pytorch_ood.detector import RankFeat as PoodRankFeat
from scipy.special import softmax
from torch import nn

from oodlib import layers as L
from oodlib.detectors import DETECTORS, Head, ScoreInputs
from oodlib.detectors.gram import Gram, holdout_rows
from oodlib.detectors.multi_mahalanobis import MultiMahalanobis
from oodlib.detectors.rankfeat import RankFeat
from tests.oodlib.detectors.peer_data import images


def stages(model, names):
    """The backbone cut after each named layer: pytorch-ood's sequential ``feature_layers`` and the
    head above the last one."""
    mods = list(model.backbone)
    cuts = [mods.index(model.layer(n)) + 1 for n in names]
    parts = [nn.Sequential(*mods[a:b]) for a, b in zip([0, *cuts[:-1]], cuts)]
    return parts, nn.Sequential(*mods[cuts[-1]:], model.head)


def cases(resnet, digits_model, digits_inputs):
    digits = digits_inputs[("digits", "train")][0]
    return [(resnet, images(12, 1), ("layer1", "layer2", "layer3", "layer4")),
            (digits_model, digits[:12], ("block1", "block2", "block3"))]


def oo_rankfeat(model, x, last, before, temperature=1.0):
    """OpenOOD ``rankfeat_postprocessor.py`` (accelerate False) / the authors' ``iterate_data_rankfeat``."""
    mods = list(model.backbone)
    i4, i3 = mods.index(model.layer(last)) + 1, mods.index(model.layer(before)) + 1

    def removed(feat):
        b, c, h, w = feat.size()
        feat = feat.view(b, c, h * w)
        u, s, v = torch.linalg.svd(feat, full_matrices=False)
        return (feat - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])).view(b, c, h, w)

    with torch.no_grad():
        logits1 = model.head(nn.Sequential(*mods[i4:])(removed(nn.Sequential(*mods[:i4])(x))))
        logits2 = model.head(nn.Sequential(*mods[i3:])(removed(nn.Sequential(*mods[:i3])(x))))
        logits = (logits1 + logits2) / 2
        return (temperature * torch.logsumexp(logits / temperature, dim=1)).numpy()


def test_rankfeat_matches_pytorch_ood_and_openood(resnet, digits_model, digits_inputs):
    for model, x, names in cases(resnet, digits_model, digits_inputs):
        last, before = names[-1], names[-2]
        for name in (last, before):  # one block = pytorch-ood's RankFeat (energy, returned negated)
            lower, upper = stages(model, [name])
            theirs = PoodRankFeat(backbone=lower[0], head=upper).predict(x).numpy()
            np.testing.assert_allclose(L.rankfeat_score(model, x, [name]), -theirs, rtol=1e-5, atol=1e-5)
        fused = L.rankfeat_score(model, x, [last, before], temperature=2.0)
        np.testing.assert_allclose(fused, oo_rankfeat(model, x, last, before, 2.0), rtol=1e-5, atol=1e-5)
        det = RankFeat()
        np.testing.assert_array_equal(det.score(ScoreInputs(np.zeros((len(x), 1)), np.zeros((len(x), 1)), {"rankfeat": fused})),
                                      fused.astype(np.float32))
    assert L.DEFAULT_LAYERS["resnet50"]["rankfeat"] == ("layer4", "layer3")


def test_gram_rows_are_openood_gram_matrices():
    """Fᵖ(Fᵖᵀ1) = rowsum(FᵖFᵖᵀ), OpenOOD's ``G_p`` — also for signed maps and a B×C vector."""
    def g_p(ob, p):  # OpenOOD gram_postprocessor.py (here in float64)
        temp = ob.detach().double() ** p
        temp = temp.reshape(temp.shape[0], temp.shape[1], -1)
        temp = torch.matmul(temp, temp.transpose(dim0=2, dim1=1)).sum(dim=2)
        return (temp.sign() * torch.abs(temp) ** (1 / p)).reshape(temp.shape[0], -1)

    fmap = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in (fmap, fmap.relu(), fmap[:, :, 0, 0], 0.01 * fmap.relu()):
        np.testing.assert_allclose(L.gram_rows(t, (1, 2, 3)), torch.cat([g_p(t, p) for p in (1, 2, 3)], 1), rtol=1e-5)
    big = 1e6 * fmap.relu()  # float32 Fᵖ·ΣFᵖ would overflow at p = 5 without the per-image scale
    rows = L.gram_rows(big, (1, 5))
    assert torch.isfinite(rows).all()
    np.testing.assert_allclose(rows, torch.cat([g_p(big, p) for p in (1, 5)], 1), rtol=1e-5)


def fit_columns(model, x, names, request):
    cols = L.layer_pass(model, x, [request(tuple(names))]).columns[0]
    with torch.no_grad():
        h = model.features(x)
    return h.numpy(), model.head(h).detach().numpy(), cols


def test_gram_matches_pytorch_ood(resnet, digits_model, digits_inputs, monkeypatch):
    """Same held-out rows (pytorch-ood draws them with torch.randperm: patched to ours) → the
    same bounds and Eₗ; pytorch-ood returns Σₗ δₗ/Eₗ, ours −(Σₗ δₗ/Eₗ)/MSP."""
    for model, x, names in cases(resnet, digits_model, digits_inputs):
        x = torch.cat([x, x.flip(3), 0.5 * x, x.flip(2)])  # 48 fitting rows
        head = Head(*model.head_arrays())
        classes = head.W.shape[0]
        y = np.arange(len(x)) % classes
        h, logits, cols = fit_columns(model, x, names, L.Gram)
        det = Gram(holdout=0.2, seed=3).fit(h, y, head, extras=cols)
        held = holdout_rows(y, classes, 0.2, 3)
        perms = iter([torch.as_tensor(np.r_[np.flatnonzero(held[y == c]), np.flatnonzero(~held[y == c])]) for c in range(classes)])
        monkeypatch.setattr(PoodGram, "validation_fraction", 0.2)
        monkeypatch.setattr("pytorch_ood.detector.gram.torch.randperm", lambda n, perms=perms: next(perms))
        layers, top = stages(model, names)
        po = PoodGram(top, layers, classes, num_poles_list=[1, 2, 3, 4, 5])
        po.fit([(x, torch.as_tensor(y))])
        monkeypatch.undo()
        np.testing.assert_allclose(det.norms_, po.layer_norm.numpy(), rtol=1e-5)
        test = torch.cat([images(6, 2, x.shape[1], x.shape[2], 3.0), x[:6]])
        h, logits, cols = fit_columns(model, test, names, L.Gram)
        ours = det.score(ScoreInputs(h, logits, cols))
        theirs = po.predict(test).numpy()
        msp = softmax(logits.astype(np.float64), axis=1).max(1)
        np.testing.assert_allclose(-ours * msp, theirs, rtol=1e-5, atol=1e-5)
        assert (ours[:6] < ours[6:].min()).all()  # scaled noise deviates more than fitting rows


def test_multi_mahalanobis_matches_pytorch_ood(digits_model, digits_inputs, monkeypatch):
    """pytorch-ood: −Σₗ αₗ Mₗ with Σ an unnormalised sum → theirs = −ours/N. Its +10⁻⁶·I ridge is
    switched off and its sums run in float64 here (the ridge alone moves noise rows by 3e-4: the
    digits layers have λ_min(Σ) ≈ 3e-6)."""
    monkeypatch.setattr("pytorch_ood.detector.mmahalanobis.torch.eye", lambda n, device=None: torch.zeros(n, n, device=device))
    torch.set_default_dtype(torch.float64)
    x, y = digits_inputs[("digits", "train")]
    x, y = x[:400], y[:400]
    names = ("block1", "block2", "block3")
    h, _, cols = fit_columns(digits_model, x, names, L.LayerMeans)
    det = MultiMahalanobis(alpha=[0.5, 1.0, 2.0]).fit(h, y, Head(*digits_model.head_arrays()), extras=cols)
    layers, _ = stages(digits_model, names)
    po = PoodMultiMahalanobis(layers, alpha=[0.5, 1.0, 2.0])
    test = torch.cat([digits_inputs[("digits", "test")][0][:20], digits_inputs[("noise", "test")][0][:20]])
    try:
        po.fit([(x, torch.as_tensor(y))])
        theirs = po.predict(test).numpy()
    finally:
        torch.set_default_dtype(torch.float32)
    h, logits, cols = fit_columns(digits_model, test, names, L.LayerMeans)
    ours = det.score(ScoreInputs(h, logits, cols))
    np.testing.assert_allclose(ours, -theirs * len(y), rtol=1e-5)
    assert np.median(ours[:20]) > np.median(ours[20:])


def test_shared_pass_equals_one_statistic_at_a_time(resnet):
    x = images(4, 4)
    d = L.DEFAULT_LAYERS["resnet18"]
    reqs = [L.Gram(d["gram"], (1, 3)), L.LayerMeans(d["layer_means"]), L.NacStates(d["nac"]), L.RankFeat(d["rankfeat"]), L.AdaScale()]
    out = L.layer_pass(resnet, x, reqs)
    with torch.no_grad():
        np.testing.assert_allclose(out.logits.numpy(), resnet(x).numpy(), rtol=1e-5, atol=1e-5)
    for r, cols in zip(reqs, out.columns):
        single = L.layer_pass(resnet, x, [r]).columns[0]
        assert single.keys() == cols.keys()
        for k in cols:
            np.testing.assert_allclose(single[k], cols[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_array_equal(out.columns[0]["gram_sizes"][0], [128, 256, 512, 1024])
    means = out.columns[1]["layer_means"]
    np.testing.assert_allclose(means[:, -512:], out.features.numpy(), rtol=1e-5, atol=1e-6)  # layer4 mean = h
    assert not any(p.grad is not None for p in resnet.parameters()) and torch.is_grad_enabled()


def test_layer_errors_name_the_detector(digits_model):
    with pytest.raises(ValueError, match="'gram'.*no layer.*layer1"):
        L.check_layers(digits_model, ["layer1"], "gram")
    with pytest.raises(ValueError, match="'nac'.*no default layers for model 'vgg16'"):
        L.default_layers("nac", "vgg16", "nac")
    with pytest.raises(ValueError, match="no spatial map"):
        L.rankfeat_score(digits_model, torch.zeros(2, 1, 32, 32), ["avgpool"])
    assert {"gram", "nac", "multi_mahalanobis", "rankfeat", "adascale_a", "adascale_l"} <= set(DETECTORS)


def test_column_layout_is_checked(digits_model, digits_inputs):
    x, y = digits_inputs[("digits", "train")]
    h, logits, cols = fit_columns(digits_model, x[:80], ("block2", "block3"), L.LayerMeans)
    det = MultiMahalanobis().fit(h, y[:80], Head(*digits_model.head_arrays()), extras=cols)
    with pytest.raises(KeyError, match="fitted on its EMBED column"):
        MultiMahalanobis().fit(h, y[:80], Head(*digits_model.head_arrays()))
    _, _, other = fit_columns(digits_model, x[:8], ("block1", "block3"), L.LayerMeans)
    with pytest.raises(ValueError, match="differ from the fitted"):
        det.score(ScoreInputs(h[:8], logits[:8], other))


def test_rank1_removal_of_a_non_finite_map_is_nan():
    fmap = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    fmap[1, 0, 0, 0] = float("inf")
    out = L.remove_rank1(fmap)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[[0, 2]], L.remove_rank1(fmap[[0, 2]]), rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(out[0].reshape(4, 6)) == 3  # rank 4 → 3
