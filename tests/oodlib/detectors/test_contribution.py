"""LINE's contribution matrix: closed form vs per-image autograd (Taylor) and IntGrad on the
digits model; the DenseNet-BC-100 adapter (the LINE paper's CIFAR model) and its key layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oodlib.contribution import (
    class_mean_contributions, contribution_matrix, features_and_moments, intgrad_contributions,
    model_contribution_matrix, taylor_contributions,
)
from oodlib.models.densenet_bc import DenseNetBC, build_densenet_bc100
from oodlib.models.torchvision_models import WeightsError
from oodlib.stats import ClassMoments


def test_closed_form_on_hand_made_features():
    h = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 4.0]])
    y = np.array([0, 0, 1])
    W = np.array([[1.0, -1.0], [0.5, 2.0]])
    C = contribution_matrix(ClassMoments.from_batch(h, y, 2), W)
    # class 0 mean (2, 1) ⊙ W[0] = (2, -1); class 1 mean (0, 4) ⊙ W[1] = (0, 8)
    np.testing.assert_array_equal(C, np.array([[2.0, 0.0], [-1.0, 8.0]], np.float32))
    assert C.shape == (2, 2) and C.dtype == np.float32


@pytest.fixture(scope="module")
def train(digits_inputs):
    x, y = digits_inputs[("digits", "train")]
    return x, np.asarray(y)


def test_closed_form_equals_autograd_taylor(digits_model, train):
    x, y = train
    closed = model_contribution_matrix(digits_model, x, y, batch_size=97)
    taylor = class_mean_contributions(taylor_contributions(digits_model, x, y), y, digits_model.num_classes)
    assert closed.shape == (digits_model.feature_dim, digits_model.num_classes)
    assert np.abs(closed - taylor).max() <= 1e-5


def test_intgrad_keeps_top_k_order(digits_model, train):
    x, y = train
    taylor = class_mean_contributions(taylor_contributions(digits_model, x, y), y, digits_model.num_classes)
    intgrad = class_mean_contributions(intgrad_contributions(digits_model, x, y, steps=8), y, digits_model.num_classes)
    k = 10
    differing = [
        c for c in range(taylor.shape[1])
        if not np.array_equal(np.argsort(-taylor[:, c], kind="stable")[:k], np.argsort(-intgrad[:, c], kind="stable")[:k])
    ]
    assert differing == [], f"top-{k} neuron order differs for classes {differing}"


def test_features_and_moments_match_model(digits_model, train):
    x, y = train
    h, moments = features_and_moments(digits_model, x[:50], y[:50], batch_size=16)
    with torch.no_grad():
        np.testing.assert_allclose(h, digits_model.features(x[:50]).numpy(), rtol=1e-5, atol=1e-6)
    assert moments.counts.sum() == 50


def test_densenet_bc100_layout_and_checkpoint(tmp_path):
    net = DenseNetBC(100, 10)
    sd = net.state_dict()
    assert len(sd) == 596
    assert sd["conv1.weight"].shape == (24, 3, 3, 3)
    assert sd["block1.layer.15.conv2.weight"].shape == (12, 48, 3, 3)
    assert sd["trans1.conv1.weight"].shape == (108, 216, 1, 1)
    assert sd["trans2.conv1.weight"].shape == (150, 300, 1, 1)
    assert sd["fc.weight"].shape == (10, 342) and "bn1.running_var" in sd
    # the authors' checkpoints: {"state_dict": …} saved from DataParallel ("module." prefix)
    torch.manual_seed(0)
    src = DenseNetBC(100, 10)
    path = tmp_path / "densenet_c10.pth"
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = build_densenet_bc100(10, weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.features(x)
        src.eval()
        out = src.conv1(x)
        out = src.trans1(src.block1(out))
        out = src.trans2(src.block2(out))
        ref = torch.nn.functional.avg_pool2d(torch.relu(src.bn1(src.block3(out))), 8).flatten(1)
    assert h.shape == (2, 342) and model.feature_dim == 342 and model.num_classes == 10
    torch.testing.assert_close(h, ref)
    torch.testing.assert_close(model(x), src.fc(ref))
    assert model.default_layer == "block3" and model.preprocess.size == (32, 32)
    with pytest.raises(WeightsError):
        build_densenet_bc100(100, weights=path)
