"""torchvision classifiers as :class:`ModelAdapter`: resnet18/50, densenet121, mobilenet_v2, vgg16.

Weights come from a local file (a state dict loaded with ``torch.load(..., weights_only=True)``
or a safetensors file) or a torchvision weights name (``"IMAGENET1K_V1"``) where the machine can
download; nothing is downloaded otherwise, and a failure says what to do instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodlib.data.preprocess import IMAGENET_PREPROCESS, Preprocess
from oodlib.models.base import ModelAdapter

TORCHVISION_MODELS = ("resnet18", "resnet50", "densenet121", "mobilenet_v2", "vgg16")


class WeightsError(RuntimeError):
    """Model weights that are missing, unreadable or do not fit the architecture."""


def _resnet(net: nn.Module) -> tuple[nn.Module, nn.Linear, dict[str, nn.Module], str]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    layers = {"stem": stem, "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4}
    backbone = nn.Sequential(*layers.values(), net.avgpool, nn.Flatten())
    return backbone, net.fc, layers, "layer4"


def _densenet(net: nn.Module) -> tuple[nn.Module, nn.Linear, dict[str, nn.Module], str]:
    f = net.features
    layers = {name: mod for name, mod in f.named_children() if name.startswith(("denseblock", "transition"))}
    backbone = nn.Sequential(f, nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return backbone, net.classifier, layers, "denseblock4"


def _mobilenet_v2(net: nn.Module) -> tuple[nn.Module, nn.Linear, dict[str, nn.Module], str]:
    layers = {f"features.{i}": m for i, m in enumerate(net.features)}
    backbone = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    # classifier = Dropout, Linear: dropout is the identity in eval mode
    return backbone, net.classifier[1], layers, f"features.{len(net.features) - 1}"


def _vgg16(net: nn.Module) -> tuple[nn.Module, nn.Linear, dict[str, nn.Module], str]:
    layers = {f"features.{i}": m for i, m in enumerate(net.features)}
    # penultimate = output of the second fully connected block (fc7 after ReLU and dropout)
    backbone = nn.Sequential(net.features, net.avgpool, nn.Flatten(), *net.classifier[:-1])
    last_conv = max(i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d))
    return backbone, net.classifier[-1], layers, f"features.{last_conv + 1}"  # the ReLU after it


_SPLITTERS = {"resnet18": _resnet, "resnet50": _resnet, "densenet121": _densenet, "mobilenet_v2": _mobilenet_v2, "vgg16": _vgg16}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch checkpoint (``weights_only=True``).

    Checkpoints that wrap the weights (``{"state_dict": …}`` / ``{"model": …}``) and
    DataParallel ``module.`` prefixes are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_torchvision(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    preprocess: Preprocess | None = None,
) -> ModelAdapter:
    """A torchvision classifier as an adapter.

    ``weights``: a file path, a torchvision weights enum name (``"IMAGENET1K_V1"``, needs a
    download the first time), or None for random initialization (tests, benchmarks).
    ``num_classes`` None: read from the weights file's head (else 1000). ``preprocess`` defaults
    to ImageNet's (224 px crop of a 256 px resize); other inputs say so (``model.preset`` …).
    """
    if name not in _SPLITTERS:
        raise KeyError(f"unknown model {name!r}; known: {TORCHVISION_MODELS}")
    import torchvision  # here, not at module level: importing it costs seconds a cached re-run does not need

    builder = getattr(torchvision.models, name)
    if weights is not None and not Path(str(weights)).suffix and not Path(str(weights)).exists():
        try:
            net = builder(weights=str(weights))
        except Exception as exc:
            raise WeightsError(
                f"cannot get torchvision weights {weights!r} for {name} ({type(exc).__name__}: {exc}); "
                "download them where the network allows and set model.weights to the local file"
            ) from exc
    else:
        state = load_state_dict_file(weights) if weights is not None else None
        if num_classes is None:
            num_classes = head_classes(state) if state is not None else 1000
        net = builder(weights=None, num_classes=num_classes)
        if state is not None:
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise WeightsError(f"weights file {weights} does not fit {name} with {num_classes} classes: {exc}") from exc
    backbone, head, layers, default_layer = _SPLITTERS[name](net)
    return ModelAdapter(name, backbone, head, layers, default_layer, preprocess or IMAGENET_PREPROCESS).eval()


def head_classes(state: dict) -> int:
    """Classes of a classifier state dict: rows of its last 2-D weight (the linear head)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    if not weights:
        raise WeightsError("cannot tell the number of classes: the weights have no linear head; set model.num_classes")
    return int(weights[-1].shape[0])
