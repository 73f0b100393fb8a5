"""Model adapters: the features/head split reproduces the original network; weights loading is safe."""
import numpy as np
import pytest
import torch
import torchvision

from oodlib.models import MODELS, WeightsError, build_model, load_model
from oodlib.models.base import state_dict_hash


def _same_seed_pair(name, num_classes):
    """An adapter and a plain torchvision network built from the same seed (hence equal weights)."""
    torch.manual_seed(0)
    adapter = build_model(name, num_classes=num_classes)
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes).eval()
    return adapter, net


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v2", "vgg16"])
def test_split_equals_torchvision_forward(name):
    adapter, net = _same_seed_pair(name, 10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = adapter.features(x)
        np.testing.assert_allclose(adapter.head(h).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)
    assert h.shape == (2, adapter.feature_dim)
    assert adapter.layer() is adapter.layer(adapter.default_layer)


def test_weights_file_round_trip_and_errors(tmp_path):
    model, net = _same_seed_pair("resnet18", 5)
    path = tmp_path / "r18.pth"
    # a DataParallel checkpoint wrapped in {"state_dict": …}, as training scripts save them
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_model("resnet18", str(path), num_classes=5)
    assert loaded.weights_hash() == model.weights_hash()
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="does not fit"):
        load_model("resnet18", str(path), num_classes=7)
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_model("resnet18", str(tmp_path / "evil.pth"))
    with pytest.raises(WeightsError, match="set model.weights to the local file"):
        load_model("resnet18", "NO_SUCH_WEIGHTS_V9")
    with pytest.raises(KeyError, match="unknown model"):
        load_model("alexnet")


def test_pickled_code_is_not_executed(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "bad.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Boom()}, fh)
    with pytest.raises(WeightsError):
        load_model("resnet18", str(path))


def test_digits_cnn_is_trained_and_cached(digits_model, digits_inputs):
    x, y = digits_inputs[("digits", "test")]
    with torch.no_grad():
        acc = (digits_model(x).argmax(1).numpy() == y).mean()
    assert acc > 0.95
    again = load_model("digits-cnn")
    assert again.weights_hash() == digits_model.weights_hash()
    assert digits_model.layer_names == ["block1", "block2", "block3"] and digits_model.default_layer == "block3"


def test_state_dict_hash_sensitive_to_values():
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.zeros(3), "b": torch.tensor([1.0, 1.0 + 1e-6])}
    assert state_dict_hash(a) != state_dict_hash(b)
    assert state_dict_hash(a) == state_dict_hash(dict(reversed(list(a.items()))))
    assert "digits-cnn" in MODELS


def test_digits_cnn_cache_key_is_a_cheap_fingerprint():
    """The cache key is stable and changes with the seed (a different training set)."""
    from oodlib.models.digits_cnn import training_fingerprint

    a = training_fingerprint(0)
    assert a == training_fingerprint(0) and a != training_fingerprint(1) and len(a) == 16


def test_preprocessing_is_the_models_own_or_the_configs_never_guessed_from_classes(tmp_path):
    import torch

    from oodlib.data.preprocess import CIFAR_PREPROCESS, IMAGENET_PREPROCESS, resolve_preprocess

    m = load_model("resnet18", None, num_classes=10)
    assert m.preprocess == IMAGENET_PREPROCESS  # 10 classes do not make it a CIFAR model
    pre = resolve_preprocess(m.preprocess, "cifar", input_size=40, mean=[0.5, 0.5, 0.5])
    assert pre.size == (40, 40) and pre.mean == (0.5, 0.5, 0.5) and pre.std == CIFAR_PREPROCESS.std
    assert resolve_preprocess(IMAGENET_PREPROCESS, crop=False).resize is None
    with pytest.raises(ValueError, match="3 value"):
        resolve_preprocess(IMAGENET_PREPROCESS, mean=[0.5])
    # the number of classes comes from the checkpoint's head
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "r.pth")
    assert load_model("resnet18", str(tmp_path / "r.pth")).num_classes == 7
