"""Layer conductance: completeness, the paper's right-end rule, equality with Captum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from oodlib.errors.conductance import (
    METHODS,
    conductance_forward,
    layer_conductance,
    path_alphas,
)
from oodlib.models.base import ModelAdapter


@pytest.fixture(scope="module")
def batch(digits_inputs):
    x, _ = digits_inputs[("digits-c", "test")]
    return x[::300][:12].clone()


def _completeness_gap(model, x, cond):
    """|Σ conductance − (F(x) − F(0))| / |F(x) − F(0)| per image, F = predicted logit."""
    with torch.no_grad():
        logits, base = model(x), model(torch.zeros_like(x[:1]))[0]
    pred = logits.argmax(1)
    delta = logits.gather(1, pred[:, None])[:, 0] - base[pred]
    return ((cond.sum(1) - delta).abs() / delta.abs()).numpy()


@pytest.mark.parametrize("method", ["right_riemann", "left_riemann"])
def test_completeness_exact_when_the_top_is_linear(digits_model, batch, method):
    # above block3 the model is avgpool + linear: the Riemann sum telescopes exactly, for any n
    for n in (1, 3):
        cond = layer_conductance(digits_model, batch, "block3", n_steps=n, method=method)
        assert _completeness_gap(digits_model, batch, cond).max() < 1e-4


@pytest.mark.parametrize("method", ["right_riemann", "left_riemann", "gausslegendre"])
def test_completeness_error_shrinks_with_n(digits_model, batch, method):
    gaps = [_completeness_gap(digits_model, batch, layer_conductance(digits_model, batch, "block2", n, method)).mean()
            for n in (10, 50, 200)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < gaps[0] / 10 and gaps[2] < 1e-2  # O(1/n): 20× more steps, ≥ 10× smaller gap


def test_right_riemann_matches_equation_5(digits_model, batch):
    """A naive per-step implementation of seed eq. 5 (gradient at the right end of each step)."""
    x, n = batch[:4], 4
    layer = digits_model.layer("block2")
    outs = []
    handle = layer.register_forward_hook(lambda _m, _i, o: outs.append(o))
    pred = digits_model(x).argmax(1)
    outs.clear()
    total = torch.zeros(len(x), 32)
    ys = []
    for k in range(n + 1):
        logits = digits_model((k / n) * x)
        y = outs[-1]
        ys.append(y.detach())
        if k:
            (g,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), y)
            total += (g * (ys[k] - ys[k - 1])).sum((2, 3))
    handle.remove()
    cond = layer_conductance(digits_model, x, "block2", n_steps=n, method="right_riemann")
    torch.testing.assert_close(cond, total, rtol=1e-4, atol=1e-5)


CAPTUM_METHODS = {"left_riemann": "riemann_trapezoid", "gausslegendre": "gausslegendre", "captum_riemann_left": "riemann_left"}


def _captum(model, x, layer, n, method, target):
    from captum.attr import LayerConductance

    attr = LayerConductance(model, model.layer(layer)).attribute(x, target=target, n_steps=n, method=method)
    return attr.flatten(2).sum(-1).detach()


def _assert_rel_close(a, b, rel=1e-4):
    assert (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("method", sorted(CAPTUM_METHODS))
@pytest.mark.parametrize("layer", ["block3", "block2"])
def test_equals_captum_on_digits(digits_model, batch, method, layer):
    target = digits_model(batch).argmax(1)
    ours = layer_conductance(digits_model, batch, layer, n_steps=10, method=method)
    _assert_rel_close(ours, _captum(digits_model, batch, layer, 10, CAPTUM_METHODS[method], target))


@pytest.mark.parametrize("method", ["left_riemann", "gausslegendre"])
def test_equals_captum_on_resnet18(method):
    from oodlib.models import load_model

    torch.manual_seed(0)
    model = load_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    target = model(x).argmax(1)
    for layer in ("layer4", "layer3"):
        ours = layer_conductance(model, x, layer, n_steps=6, method=method)
        assert ours.shape == (2, model.layer(layer)[-1].conv2.out_channels)
        _assert_rel_close(ours, _captum(model, x, layer, 6, CAPTUM_METHODS[method], target))


@pytest.mark.parametrize("method", METHODS)
def test_forward_outputs_targets_and_chunking(digits_model, batch, method):
    res = conductance_forward(digits_model, batch, n_steps=5, method=method)
    with torch.no_grad():
        logits, h = digits_model(batch), digits_model.features(batch)
    torch.testing.assert_close(res.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.features, h, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.target, logits.argmax(1))
    assert res.conductance.shape == (len(batch), 64)
    # chunked passes and an explicit target give the same values
    chunked = layer_conductance(digits_model, batch, n_steps=5, method=method, target=res.target.numpy(), max_points=13)
    torch.testing.assert_close(chunked, res.conductance, rtol=1e-5, atol=1e-5)


def test_target_other_than_prediction(digits_model, batch):
    other = (digits_model(batch).argmax(1) + 1) % 8
    cond = layer_conductance(digits_model, batch, "block3", n_steps=3, target=other)
    with torch.no_grad():
        delta = digits_model(batch).gather(1, other[:, None])[:, 0] - digits_model(torch.zeros_like(batch[:1]))[0, other]
    torch.testing.assert_close(cond.sum(1), delta, rtol=1e-4, atol=1e-4)


class _NonSequential(nn.Module):
    """The digits backbone behind a custom forward (forces the hook-based split)."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x):
        for m in self.seq:
            x = m(x)
        return x


def test_hook_split_for_non_sequential_backbones(digits_model, batch):
    seq = digits_model.backbone
    custom = ModelAdapter(
        "custom", _NonSequential(seq), digits_model.head, {"block2": seq[1], "block3": seq[2]}, "block3",
        digits_model.preprocess,
    ).eval()
    for method in ("right_riemann", "left_riemann"):
        ref = conductance_forward(digits_model, batch, "block2", n_steps=4, method=method)
        got = conductance_forward(custom, batch, "block2", n_steps=4, method=method)
        torch.testing.assert_close(got.conductance, ref.conductance, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_path_alphas_and_errors(digits_model, batch):
    a, side = path_alphas("right_riemann", 4)
    assert np.allclose(a, [0, 0.25, 0.5, 0.75, 1.0]) and side == "right"
    a, side = path_alphas("captum_riemann_left", 4)
    assert np.allclose(a, [0, 0.2, 0.4, 0.6, 0.8]) and side == "left"
    a, _ = path_alphas("gausslegendre", 4)
    assert len(a) == 5 and 0 < a[0] < a[-1] < 1
    with pytest.raises(ValueError, match="unknown conductance method"):
        path_alphas("trapezoid", 4)
    digits_model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            layer_conductance(digits_model, batch)
    finally:
        digits_model.eval()


def test_inference_trunk_folds_and_follows_weight_changes(digits_model, batch):
    """The cached BN-folded trunk gives Captum's values, also after an in-place weight change."""
    from oodlib.errors.conductance import split_at_layer

    x = batch[:4]
    split = split_at_layer(digits_model, "block3", example=x)
    with torch.inference_mode():
        torch.testing.assert_close(split.lower(x), digits_model.backbone[:3](x), rtol=1e-4, atol=1e-5)

    def check():
        target = digits_model(x).argmax(1)
        ours = layer_conductance(digits_model, x, "block3", n_steps=4, method="left_riemann", target=target)
        _assert_rel_close(ours, _captum(digits_model, x, "block3", 4, "riemann_trapezoid", target))
        return ours

    before = check()  # fills the cache
    conv = digits_model.layer("block2")[0].weight
    with torch.no_grad():
        conv.mul_(-1)  # in place, as a mutant is applied
    try:
        assert not torch.allclose(check(), before)
    finally:
        with torch.no_grad():
            conv.mul_(-1)
    torch.testing.assert_close(check(), before)
    # a mutant applied and reverted between two calls (as LCR does) leaves the cached trunk valid
    from oodlib.errors.mutants import Mutant, applied, mutant_patches

    runner = split_at_layer(digits_model, "block3", example=x).lower
    with applied(mutant_patches(digits_model, Mutant("NAI", 0.2, 0))):
        pass
    assert split_at_layer(digits_model, "block3", example=x).lower is runner
