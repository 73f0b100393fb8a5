"""NAC-UE and AdaSCALE against transcriptions of the official code (neither is in pytorch-ood 0.4
in the same form: its NACUE pools o⊙g and uses other bins; it has no AdaSCALE), on a random-weight
ResNet-18 at 64 px and on the trained digits-cnn."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from oodlib import layers as L
from oodlib.detectors import Head, ScoreInputs
from oodlib.detectors.adascale import AdaScaleA, AdaScaleL
from oodlib.detectors.nac import NACUE, balanced_subset, nac_thresholds
from tests.oodlib.detectors.peer_data import images


def models(resnet, digits_model, digits_inputs):
    d = digits_inputs[("digits", "train")]
    digits_test = torch.cat([digits_inputs[("digits", "test")][0][:6], digits_inputs[("noise", "test")][0][:4]])
    return [(resnet, images(24, 1), np.arange(24) % 4, torch.cat([images(6, 2), images(4, 3, scale=2.0)]), ("avgpool", "layer3", "layer2", "layer1")),
            (digits_model, d[0][:32], d[1][:32], digits_test, ("avgpool", "block2", "block1"))]


# --- BierOne/ood_coverage@b002780, transcribed ----------------------------------------------------


def logspace(base=10, num=100):  # nac/coverage.py
    num = int(num / 2)
    x = np.linspace(1, np.sqrt(base), num=num)
    x_l = np.emath.logn(base, x)
    x_r = (1 - x_l)[::-1]
    x = np.concatenate([x_l[:-1], x_r])
    x[-1] += 1e-2
    return torch.from_numpy(np.append(x, 1.2))


class Estimator:  # nac/coverage.py (update, get_score with method "avg", ood_test)
    def __init__(self, neuron_num, M=1000, O=1):
        self.M, self.O, self.N = M, O, neuron_num
        self.thresh = logspace(1e3, M).view(M, -1).repeat(1, neuron_num)
        self.t_act = torch.zeros(M - 1, neuron_num)

    def update(self, states):
        b_act = (states.unsqueeze(1) >= self.thresh[:self.M - 1].unsqueeze(0)) & \
                (states.unsqueeze(1) < self.thresh[1:self.M].unsqueeze(0))
        self.t_act += b_act.sum(dim=0)

    def get_score(self):
        self.n_coverage = torch.min(self.t_act / self.O, torch.ones_like(self.t_act))

    def ood_test(self, states):
        b_act = (states.unsqueeze(1) >= self.thresh[:self.M - 1].unsqueeze(0)) & \
                (states.unsqueeze(1) < self.thresh[1:self.M].unsqueeze(0))
        return (b_act * self.n_coverage.unsqueeze(0)).sum(dim=1).mean(dim=1)


def kl_grad(b_state, outputs, retain_graph=False):  # nac/instr_state.py
    logsoftmax = torch.nn.LogSoftmax(dim=-1)
    targets = torch.ones_like(outputs) / outputs.shape[-1]
    loss = torch.sum(-targets * logsoftmax(outputs), dim=-1)
    return torch.autograd.grad(loss.sum(), b_state, create_graph=False, retain_graph=retain_graph)[0]


def authors_states(model, x, names, alphas):
    """KMNC.assess's per-layer states sigmoid(α·avg_pooling(o)·avg_pooling(g)) (avg_pooling sums)."""
    mods = {n: (list(model.backbone)[-2] if n == "avgpool" else model.layer(n)) for n in names}
    kept = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: kept.__setitem__(n, o)) for n, m in mods.items()]
    with torch.enable_grad():
        p = model(x)
        out = []
        for j, (n, a) in enumerate(zip(names, alphas)):
            g = kl_grad(kept[n], p, retain_graph=j < len(names) - 1)
            o_, g_ = kept[n].detach().sum(dim=[2, 3]), g.sum(dim=[2, 3])
            out.append(1 / (1 + torch.exp(-a * (o_ * g_))))
    for h in handles:
        h.remove()
    return out


def train_subset(labels, valid_num, rand_seed=1):  # nac/utils.py TrainSubset(balanced=True)
    cls_to_idxes = defaultdict(list)
    for idx, lab in enumerate(labels):
        cls_to_idxes[lab].append(idx)
    min_len = min(len(inds) for inds in cls_to_idxes.values())
    sub_num = min(int(valid_num / len(cls_to_idxes)), min_len)
    valid = []
    for cls in cls_to_idxes:
        inds = cls_to_idxes[cls]
        np.random.RandomState(rand_seed).shuffle(inds)
        valid += inds[:sub_num]
    return sorted(valid)


def test_nac_bins_and_subset_are_the_authors():
    for m in (4, 50, 500, 1000):
        np.testing.assert_array_equal(nac_thresholds(m), logspace(1e3, m).numpy())
    labels = np.random.default_rng(0).integers(0, 5, 300)
    for total in (50, 1000):
        np.testing.assert_array_equal(balanced_subset(labels, 5, total, 1), train_subset(labels.tolist(), total))
    with pytest.raises(ValueError, match="even"):
        nac_thresholds(51)


def test_nac_matches_the_authors_code(resnet, digits_model, digits_inputs):
    for model, x, y, test, names in models(resnet, digits_model, digits_inputs):
        cols = L.nac_states(model, x, names)
        prods = np.split(cols["nac"], np.cumsum(cols["nac_sizes"][0].astype(int))[:-1], axis=1)
        alphas = [float(1 / np.abs(p).mean()) for p in prods]  # states spread over (0, 1)
        ms, os_ = [50, 100, 50, 500][: len(names)], [2, 3, 1, 4][: len(names)]
        head = Head(*model.head_arrays())
        det = NACUE(alpha=alphas, m_bins=ms, o_star=os_, fit_samples=16).fit(np.zeros((len(x), 1)), y, head, extras=cols)
        rows = train_subset(y.tolist(), 16)
        ests = [Estimator(p.shape[1], m, o) for p, m, o in zip(prods, ms, os_)]
        for est, s in zip(ests, authors_states(model, x[rows], names, alphas)):
            est.update(s)
            est.get_score()
        tcols = L.nac_states(model, test, names)
        theirs = sum(est.ood_test(s) for est, s in zip(ests, authors_states(model, test, names, alphas))) / len(names)
        ours = det.score(ScoreInputs(np.zeros((len(test), 1)), np.zeros((len(test), 1)), tcols))
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)
        assert 0 < ours.min() < ours.max() < 1  # a non-degenerate check: coverage varies
        fitted = det.score(ScoreInputs(np.zeros((len(x), 1)), np.zeros((len(x), 1)), cols))
        assert fitted[rows].mean() > ours.mean()  # the fitting rows are covered


# --- Jingkang50/OpenOOD@3c35632 AdaSCALE, transcribed ---------------------------------------------


class ECDF:  # statsmodels.distributions.empirical_distribution.ECDF (side="right")
    def __init__(self, x):
        x = np.sort(np.asarray(x))
        self.x, self.y = np.r_[-np.inf, x], np.r_[0.0, np.linspace(1.0 / len(x), 1, len(x))]

    def __call__(self, t):
        return self.y[np.searchsorted(self.x, t, "right") - 1]


def oo_perturbed(model, data, o=0.05):  # adascale_postprocessor.py setup/postprocess + perturb
    data = data.clone().requires_grad_(True)
    with torch.enable_grad():
        feature = model.features(data)
        output = model.head(feature)
        labels = output.detach().argmax(dim=1)
        output[torch.arange(len(labels)), labels].sum().backward()
    grad = data.grad.detach()
    data = data.detach()
    b, c, h, w = data.shape
    n_pixels = int(c * h * w * o)
    abs_grad = abs(grad).view(b, c * h * w)
    _, topk_indices = torch.topk(abs_grad, n_pixels, dim=1, largest=False)
    mask = torch.zeros_like(abs_grad, dtype=torch.uint8)
    mask.scatter_(1, topk_indices, 1)
    with torch.no_grad():
        feature_perturbed = model.features(data + grad.sign() * mask.view(b, c, h, w) * 0.5)
    feature = feature.detach()
    return feature, feature_perturbed, abs(feature - feature_perturbed)


def oo_adascale(model, val, test, percentile=(75, 85), k1=5, k2=1, lmbda=10, o=0.05, logit_scaling=False):
    f, fp, fs = oo_perturbed(model, val, o)
    k1_, k2_ = int(f.shape[1] * k1 / 100), int(f.shape[1] * k2 / 100)

    def q(f, fp, fs):
        top1 = torch.gather(torch.relu(fp), 1, torch.topk(f, dim=1, k=k1_)[1])
        top2 = torch.gather(fs, 1, torch.topk(f, dim=1, k=k2_)[1])
        return top1.sum(dim=1) + lmbda * top2.sum(dim=1)

    ecdf = ECDF(q(f, fp, fs).numpy())
    f, fp, fs = oo_perturbed(model, test, o)
    percentiles = torch.from_numpy(percentile[0] + (1 - ecdf(q(f, fp, fs).numpy())) * (percentile[1] - percentile[0]))
    x = torch.relu(f)  # adascale_net.py ada_scale
    n = x.shape[1]
    ks = n - torch.round(n * percentiles / 100.0).to(torch.int)
    values, _ = torch.topk(x, int(ks.max()), dim=1)
    mask = torch.arange(int(ks.max()))[None, :] < ks[:, None]
    scale = x.sum(dim=1, keepdim=True) / (values * mask).sum(dim=1, keepdim=True)
    with torch.no_grad():
        logits = model.head(f) * scale**2.0 if logit_scaling else model.head(f * torch.exp(scale))
    return torch.logsumexp(logits, dim=1).numpy()


def test_adascale_matches_openood(resnet, digits_model, digits_inputs):
    for model, val, _, test, _ in models(resnet, digits_model, digits_inputs):
        head = Head(*model.head_arrays())
        cols = L.adascale_terms(model, val)
        with torch.no_grad():
            h_val, h_test = model.features(val).numpy(), model.features(test).numpy()
        tcols = L.adascale_terms(model, test)
        for cls, logit_scaling in ((AdaScaleA, False), (AdaScaleL, True)):
            det = cls(percentile=(70, 90)).fit(h_val, np.zeros(len(val), int), head, extras=cols)
            ours = det.score(ScoreInputs(h_test, head.logits(h_test), tcols))
            theirs = oo_adascale(model, val, test, percentile=(70, 90), logit_scaling=logit_scaling)
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
            p = det.percentiles(ScoreInputs(h_test, head.logits(h_test), tcols))
            assert 70 <= p.min() < p.max() <= 90  # the per-image percentile does vary
    assert AdaScaleA.fit_split == "val" and AdaScaleA().percentile == (75.0, 85.0)


def test_adascale_subsamples_the_ecdf():
    rng = np.random.default_rng(0)
    cols = {"adascale_correction": rng.random(50).astype(np.float32), "adascale_shift": rng.random(50).astype(np.float32)}
    head = Head(np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    det = AdaScaleA(num_samples=20).fit(np.ones((50, 3), np.float32), np.zeros(50, int), head, extras=cols)
    assert det.ecdf_.shape == (20,) and np.all(np.diff(det.ecdf_) >= 0)
