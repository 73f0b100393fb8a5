"""Propagation rules: peers (zennit, Captum), conservation, hand-computed RAP cases, errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from oodlib.attribution import attribute, build_program, make_rule
from oodlib.attribution.engine import propagate
from oodlib.attribution.program import ConvOp, LinearOp, UnsupportedLayerError, run
from oodlib.attribution.rules import (
    RAP,
    AttributionEquilibrium,
    safe_div,
    shift_nonzero,
)
from oodlib.data.preprocess import DIGITS_PREPROCESS
from oodlib.models.base import ModelAdapter


def _zennit(model, x, rule, target, canonizer):
    from zennit.attribution import Gradient
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import Norm, Pass, ZBox
    from zennit.types import Activation, AvgPool, Convolution, Linear

    low = x.amin((1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax((1, 2, 3), keepdim=True).expand_as(x)
    comp = SpecialFirstLayerMapComposite(
        layer_map=[(Activation, Pass()), (AvgPool, Norm()), ((Convolution, Linear), rule)],
        first_map=[(Convolution, ZBox(low, high))],
        canonizers=[canonizer],
    )
    with Gradient(model=copy.deepcopy(model), composite=comp) as attr:
        _, rel = attr(x, lambda o: torch.zeros_like(o).scatter_(1, target[:, None], o.gather(1, target[:, None])))
    return rel


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def digits_x(digits_inputs):
    return digits_inputs[("digits", "test")][0][:2]


@pytest.mark.parametrize("method", ["lrp-eps", "lrp-a1b0", "lrp-a2b1"])
def test_lrp_equals_zennit_digits(digits_model, digits_x, method):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.rules import AlphaBeta, Epsilon

    zrule = {"lrp-eps": Epsilon(1e-6), "lrp-a1b0": AlphaBeta(1.0, 0.0), "lrp-a2b1": AlphaBeta(2.0, 1.0)}[method]
    ours, _, t = attribute(digits_model, digits_x, method)
    ref = _zennit(digits_model, digits_x, zrule, t, SequentialMergeBatchNorm())
    assert _rel(ours, ref) <= 1e-4


@pytest.mark.slow
def test_lrp_equals_zennit_vgg16():
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.rules import AlphaBeta, Epsilon

    from oodlib.models import load_model

    torch.manual_seed(0)
    model = load_model("vgg16")
    x = torch.randn(2, 3, 64, 64)
    for method, zrule in (("lrp-eps", Epsilon(1e-6)), ("lrp-a2b1", AlphaBeta(2.0, 1.0))):
        ours, _, t = attribute(model, x, method)
        assert _rel(ours, _zennit(model, x, zrule, t, SequentialMergeBatchNorm())) <= 1e-4


def _check_sequential_conservation(ops, record, start, tol=1e-4):
    """Σ relevance at each op input equals Σ at its output (relative)."""
    prev = start.double()
    for op in reversed(ops):
        r = record[op.name].double()
        s = r.sum(tuple(range(1, r.ndim)))
        assert torch.all((s - prev).abs() <= tol * prev.abs().clamp(min=1e-6)), op.name
        prev = s


@pytest.mark.parametrize(
    "method,options", [("rap", {}), ("lrp-eps", {"bias": False}), ("lrp-a1b0", {"bias": False})]
)
def test_conservation_per_layer_digits(digits_model, digits_x, method, options):
    program, record = build_program(digits_model), {}
    _, logits, t = propagate(digits_model, digits_x, make_rule(method, **options), None, program, record)
    _check_sequential_conservation(program, record, logits.gather(1, t[:, None])[:, 0])


def test_rap_conservation_resnet50_blocks():
    """Bottleneck blocks (skip path, downsample branch): Σ conserved across every top-level op
    and inside every residual branch. In float64: conservation is an identity of the arithmetic
    (it holds to ~1e-13 there), while on random weights RAP's small |Z⁻| denominators let Σ|R| grow
    to 1e5·|ΣR|, beyond what float32 sums resolve at 1e-4."""
    from oodlib.models import load_model

    torch.manual_seed(0)
    model = load_model("resnet50").double()
    program, record = build_program(model), {}
    _, logits, t = propagate(model, torch.randn(2, 3, 64, 64, dtype=torch.float64), RAP(), None, program, record)
    _check_sequential_conservation(program, record, logits.gather(1, t[:, None])[:, 0])
    for op in program:
        if hasattr(op, "branch"):
            _check_sequential_conservation(op.branch[:-1], record, record[op.branch[-1].name].sum((1, 2, 3)))


def test_ae_keeps_stated_sum(digits_model, digits_x):
    """Sequential model: after every hidden 3×3 conv the sum is (γ−2)·τ (τ = 1)."""
    for gamma in (1.0, 1.5, 2.0):
        program, record = build_program(digits_model), {}
        propagate(digits_model, digits_x, AttributionEquilibrium(gamma), None, program, record)
        for op in program:
            if isinstance(op, ConvOp) and not op.first:
                s = record[op.name].sum((1, 2, 3))
                assert torch.allclose(s, torch.full_like(s, gamma - 2.0), atol=1e-4), (op.name, s)


def test_ae_ablation_sums(digits_model, digits_x):
    """C only keeps (γ−1)τ, A+U keeps 0, C+Ψ keeps (γ−2)τ at the hidden conv layers."""
    expected = {("C",): 1.0, ("A", "U"): 0.0, ("C", "shift"): 0.0, ("C", "A", "U"): 1.0}
    for terms, value in expected.items():
        program, record = build_program(digits_model), {}
        propagate(digits_model, digits_x, AttributionEquilibrium(2.0, terms), None, program, record)
        s = record["backbone.2.0"].sum((1, 2, 3))
        assert torch.allclose(s, torch.full_like(s, value), atol=1e-4), (terms, s)


def test_rap_head_absolute_influence_normalization():
    """Two inputs x = (2, 1), w_t = (1, −3), b = 2: z = (2, −3), logit = 1.
    Bias shares: Pos = 2, Neg = −3 → b⁺ = 2·2/(−1) = −4 onto input 0, b⁻ = 2·(−3)/(−1) = 6 onto input 1.
    C = (2 − 4, −3 + 6) = (−2, 3); R = |C|·ΣC/Σ|C| = (2, 3)·1/5."""
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -3.0]]))
        lin.bias.fill_(2.0)
    R = RAP().head(LinearOp("head", lin, True), torch.tensor([[2.0, 1.0]]), None, torch.tensor([0]))
    assert torch.allclose(R, torch.tensor([[0.4, 0.6]]))


def test_rap_linear_propagation_and_shift():
    """x = (1, 2), W = [[1, −1], [2, 1]] (rows = outputs), R = (1, −1).
    Output 0: z⁺ = 1 (x0), |z⁻| = 2 (x1); output 1: z⁺ = 4, |z⁻| = 0.
    Linear rule: R via w⁺ by z⁺ share, plus R·|z⁻|/(z⁺+|z⁻|) via |w⁻|:
      input 0: 1·1/1 (out 0) + (−1)·2/4 (out 1) = 0.5;  input 1: 1·2/3 (out 0) + (−1)·2/4 = 1/6.
    ΣC = 2/3, ΣR = 0 → shift 1/3 from both non-zero entries: (1/6, −1/6)."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
    R = RAP().linear(LinearOp("fc", lin), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -1.0]]))
    assert torch.allclose(R, torch.tensor([[1 / 6, -1 / 6]]), atol=1e-6)


def test_rap_conv_routes_negative_relevance_through_negative_weights():
    """1×1 conv, 2 inputs → 1 output, w = (1, −1), x = (3, 1): z⁺ = 3, |z⁻| = 1.
    R = −2: conv rule routes R⁻ fully via |w⁻| (input 1 gets −2) plus the share −2·1/4 via |w⁻|
    (input 1 gets −0.5): C = (0, −2.5); shift (−2.5 + 2)/1 from the only non-zero entry → (0, −2)."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    op = ConvOp("c", conv, nonneg_input=True)
    x = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    _, (cache,) = run([op], x, split=True)
    assert (float(cache.zp), float(cache.zn)) == (3.0, 1.0)
    R = RAP().conv(op, cache, torch.tensor(-2.0).view(1, 1, 1, 1))
    assert torch.allclose(R.flatten(), torch.tensor([0.0, -2.0]))
    with pytest.raises(UnsupportedLayerError, match="'c'"):
        RAP().conv(ConvOp("c", conv), cache, torch.tensor(-2.0).view(1, 1, 1, 1))


def test_shift_nonzero_hand_case():
    C = torch.tensor([[3.0, 0.0, 1.0]])
    out = shift_nonzero(C.clone(), torch.tensor([[2.0]]))
    assert torch.allclose(out, torch.tensor([[2.0, 0.0, 0.0]]))


def test_unsupported_layer_names_module():
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ModelAdapter("m", backbone, nn.Linear(4, 2), {"c": backbone[0]}, "c", DIGITS_PREPROCESS)
    with pytest.raises(UnsupportedLayerError, match="GELU"):
        build_program(model)


def test_grouped_conv_raises_naming_module():
    backbone = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ModelAdapter("m", backbone, nn.Linear(4, 2), {"c": backbone[0]}, "c", DIGITS_PREPROCESS)
    with pytest.raises(UnsupportedLayerError, match=r"'backbone\.0'.*groups=2"):
        build_program(model)


def test_rap_needs_nonnegative_conv_inputs():
    """A hidden conv fed by another conv (no ReLU between) gets signed inputs: RAP refuses it."""
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ModelAdapter("m", backbone, nn.Linear(4, 2), {"c": backbone[0]}, "c", DIGITS_PREPROCESS).eval()
    with pytest.raises(UnsupportedLayerError, match="'backbone.1'"):
        attribute(model, torch.randn(1, 1, 8, 8), "rap")


def test_gradient_baselines_equal_captum(digits_model, digits_x):
    from captum.attr import (
        InputXGradient,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        Saliency,
    )

    t = digits_model(digits_x).argmax(1)
    g, _, _ = attribute(digits_model, digits_x, "gradient")
    ref = Saliency(digits_model).attribute(digits_x, target=t, abs=False)
    assert _rel(g, ref) <= 1e-5
    ixg, _, _ = attribute(digits_model, digits_x, "input-x-gradient")
    assert _rel(ixg, InputXGradient(digits_model).attribute(digits_x, target=t)) <= 1e-5
    ig, _, _ = attribute(digits_model, digits_x, "integrated-gradients", steps=16)
    assert _rel(ig, IntegratedGradients(digits_model).attribute(digits_x, target=t, n_steps=16)) <= 1e-4
    cam, _, _ = attribute(digits_model, digits_x, "gradcam")
    ref = LayerAttribution.interpolate(
        LayerGradCam(digits_model, digits_model.layer()).attribute(digits_x, target=t, relu_attributions=True), (32, 32), "bilinear"
    )
    assert _rel(cam, ref) <= 1e-4


def test_methods_run_on_resnet_and_target_option():
    from oodlib.models import load_model

    torch.manual_seed(0)
    model = load_model("resnet50")
    x = torch.randn(2, 3, 64, 64)
    for method in ("rap", "ae", "lrp-a1b0"):
        rel, logits, t = attribute(model, x, method, target=3)
        assert rel.shape == x.shape and bool(torch.isfinite(rel).all()) and t.tolist() == [3, 3]
    rel, logits, t = attribute(model.double(), x.double(), "rap", target=3)  # float64: see the conservation test
    assert np.allclose(rel.sum((1, 2, 3)).numpy(), logits[:, 3].numpy(), rtol=1e-3)


def test_safe_div_stabilizer_convention():
    """safe_div(a, b, eps) = a / (b + eps), 0 where b == 0; b = −eps divides by eps (the authors'
    ``safe_divide``); eps = 0 is the exact division."""
    a = torch.ones(4, dtype=torch.float64)
    b = torch.tensor([1e-8, 0.0, -1e-9, 2.0], dtype=torch.float64)
    assert torch.allclose(safe_div(a, b, 1e-9), torch.tensor([1 / 1.1e-8, 0.0, 1e9, 1 / (2 + 1e-9)], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(safe_div(a, b), torch.tensor([1e8, 0.0, -1e9, 0.5], dtype=torch.float64), rtol=1e-12)


def test_rap_signals_stabilizer_closed_form():
    """One output with Z⁺ = 3, |Z⁻| = 1e-8, Z = Z⁺ + |Z⁻|. The authors' stabilized terms sum to
    S⁻ = R·(Z + |Z⁻|)/((Z+ε)(|Z⁻|+ε)) for R < 0 and S⁺ = R·Z/((Z+ε)(Z⁺+ε)), S⁻ = R·|Z⁻|/((Z+ε)(|Z⁻|+ε))
    for R > 0; ε = 1e-9 moves S⁻ of R = −2 from −2e8 − 2/Z to about −1.82e8."""
    zp, zn = torch.full((2, 1), 3.0, dtype=torch.float64), torch.full((2, 1), 1e-8, dtype=torch.float64)
    R = torch.tensor([[-2.0], [2.0]], dtype=torch.float64)
    Z = 3.0 + 1e-8
    exact = RAP().signals(R, zp, zn)
    assert torch.allclose(exact, torch.tensor([[0.0, -2e8 - 2 / Z], [2 / 3, 2 / Z]], dtype=torch.float64), rtol=1e-12)
    e = 1e-9
    stab = RAP(eps=e).signals(R, zp, zn)
    expected = [[0.0, -2 * (Z + 1e-8) / ((Z + e) * (1e-8 + e))], [2 * Z / ((Z + e) * (3 + e)), 2 * 1e-8 / ((Z + e) * (1e-8 + e))]]
    assert torch.allclose(stab, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert abs(float(stab[0, 1]) - (-2 / 1.1e-8)) < 1.0 and abs(float(exact[0, 1] - stab[0, 1]) + 2e8 - 2 / 1.1e-8) < 1.0


def test_propagate_chunks_concatenate(digits_model, digits_x):
    """Sweeps over chunks of images give the whole batch's relevance, logits, targets and record;
    per-sample targets are split with the images."""
    program, rec1, rec2 = build_program(digits_model), {}, {}
    whole = propagate(digits_model, digits_x, RAP(), None, program, rec1, chunk=len(digits_x))
    parts = propagate(digits_model, digits_x, RAP(), None, program, rec2, chunk=1)
    for a, b in zip(whole, parts):
        assert a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    assert rec1.keys() == rec2.keys() and all(rec1[k].shape == rec2[k].shape for k in rec1)
    assert propagate(digits_model, digits_x, RAP(), torch.tensor([3, 5]), program, chunk=1)[2].tolist() == [3, 5]
