"""Gaussianization: BN recalibration on the LT train data, persistence, shared-prefix features."""
from __future__ import annotations

import pytest
import torch

from oodlib.longtail.gaussianize import (
    bn_layers,
    bn_state,
    finetune_bn,
    gaussianize,
    load_bn_state,
    paired_features,
    recalibrate_bn,
    save_bn_state,
)


@pytest.fixture(scope="module")
def lt_inputs(digits_inputs):
    x, y = digits_inputs[("digits-lt100", "train")]
    return x, torch.as_tensor(y)


def pre_affine_moments(model, x):
    """Per BN layer: (mean, var) per channel of (input − running_mean)/sqrt(running_var + eps)."""
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            z = (inp[0] - mod.running_mean[None, :, None, None]) / torch.sqrt(mod.running_var + mod.eps)[None, :, None, None]
            seen[name] = (z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in bn_layers(model).items()]
    with torch.no_grad():
        model.eval().features(x)
    for h in handles:
        h.remove()
    return seen


def test_recalibrated_bn_is_standard_normal_pre_affine(digits_model, lt_inputs):
    x, _ = lt_inputs
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    g = recalibrate_bn(digits_model, x, batch_size=len(x), device="cpu")
    moments = pre_affine_moments(g, x)
    assert len(moments) == 3
    for mean, var in moments.values():  # one batch: exact mean, var = (n−1)/n of unbiased
        assert mean.abs().max() < 1e-3
        assert (var - 1).abs().max() < 0.01
    assert all(torch.equal(before[k], v) for k, v in digits_model.state_dict().items())  # original untouched
    # weights other than BN running stats are unchanged
    for k, v in g.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k])
    # the pre-trained statistics were not standard normal on this data
    orig = pre_affine_moments(digits_model, x)
    assert max(float((v - 1).abs().max()) for _, v in orig.values()) > 0.05


def test_cumulative_average_over_equal_batches(digits_model, lt_inputs):
    x, _ = lt_inputs
    x = x[:200]
    g = recalibrate_bn(digits_model, x, batch_size=50, device="cpu")
    first = bn_layers(g)["backbone.0.1"]
    assert int(first.num_batches_tracked) == 4 and first.momentum == 0.1
    with torch.no_grad():
        conv_out = digits_model.backbone[0][0](x)
    means = torch.stack([conv_out[i : i + 50].mean((0, 2, 3)) for i in range(0, 200, 50)]).mean(0)
    vars_ = torch.stack([conv_out[i : i + 50].var((0, 2, 3)) for i in range(0, 200, 50)]).mean(0)
    torch.testing.assert_close(first.running_mean, means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, vars_, rtol=1e-4, atol=1e-5)
    for mean, var in pre_affine_moments(g, x).values():
        assert mean.abs().max() < 0.15 and (var - 1).abs().max() < 0.2


def test_bn_state_roundtrip(digits_model, lt_inputs, tmp_path):
    x, _ = lt_inputs
    g = recalibrate_bn(digits_model, x, device="cpu")
    save_bn_state(g, tmp_path / "bn.safetensors")
    back = load_bn_state(digits_model, tmp_path / "bn.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(back.features(x), g.features(x))
    assert set(bn_state(g)) == {f"backbone.{i}.1.{s}" for i in range(3)
                                for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_paired_features_equal_separate_passes(digits_model, lt_inputs):
    x, _ = lt_inputs
    g = recalibrate_bn(digits_model, x, device="cpu")
    h, gf = paired_features(digits_model, g, x[:32])
    with torch.no_grad():
        torch.testing.assert_close(h, digits_model.features(x[:32]))
        torch.testing.assert_close(gf, g.features(x[:32]))


def test_finetune_changes_only_bn_and_head(digits_model, lt_inputs):
    x, y = lt_inputs
    g = gaussianize(digits_model, x, y, epochs=1, batch_size=64, device="cpu")
    before, after = digits_model.state_dict(), g.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".1." in k or k.startswith("head.") for k in changed)
    assert any(k.endswith(".1.weight") for k in changed)  # BN affine was trained
    # after fine-tuning the statistics are re-estimated: still standard normal pre-affine
    for mean, var in pre_affine_moments(g, x).values():
        assert mean.abs().max() < 0.2 and (var - 1).abs().max() < 0.25
    with pytest.raises(ValueError):
        finetune_bn(digits_model, x, None, epochs=1, device="cpu")
