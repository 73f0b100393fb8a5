"""DenseNet-BC-100 (CIFAR, growth rate 12, compression 0.5): the LINE/DICE/ReAct CIFAR model.

The module tree mirrors the authors' ``DenseNet3(depth=100, growth_rate=12, reduction=0.5,
bottleneck=True)`` so their checkpoints load unchanged (a ``{"state_dict": …}`` wrapper and
DataParallel ``module.`` prefixes are unwrapped). Expected state-dict keys (596 tensors):

* ``conv1.weight`` [24, 3, 3, 3];
* ``block{1,2,3}.layer.{0..15}.{bn1,bn2}.{weight,bias,running_mean,running_var,num_batches_tracked}``,
  ``block{b}.layer.{i}.conv1.weight`` [48, c_in, 1, 1], ``block{b}.layer.{i}.conv2.weight`` [12, 48, 3, 3];
* ``trans{1,2}.bn1.*``, ``trans1.conv1.weight`` [108, 216, 1, 1], ``trans2.conv1.weight`` [150, 300, 1, 1];
* ``bn1.*`` [342] (final BN), ``fc.weight`` [C, 342], ``fc.bias`` [C].

Penultimate features h = avgpool(relu(bn1(block3(…)))) (D = 342). Inputs are normalized with the
authors' CIFAR statistics (mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255), which
their model applied internally and the adapter's preprocessing applies instead.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from oodlib.data.preprocess import DENSENET_BC_PREPROCESS
from oodlib.models.base import ModelAdapter
from oodlib.models.torchvision_models import WeightsError, load_state_dict_file


class BottleneckBlock(nn.Module):
    """BN-ReLU-conv1×1(4g)-BN-ReLU-conv3×3(g), output concatenated to the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class TransitionBlock(nn.Module):
    """BN-ReLU-conv1×1 (compression) then 2×2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseBlock(nn.Module):
    """``n`` bottleneck layers; the attribute name ``layer`` matches the authors' keys."""

    def __init__(self, n: int, in_planes: int, growth: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[BottleneckBlock(in_planes + i * growth, growth) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32×32 inputs; ``features`` returns h (B×D), ``fc`` the head."""

    def __init__(self, depth: int = 100, num_classes: int = 10, growth: int = 12, reduction: float = 0.5) -> None:
        super().__init__()
        n = (depth - 4) // 6
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        self.block1 = DenseBlock(n, planes, growth)
        planes += n * growth
        self.trans1 = TransitionBlock(planes, int(math.floor(planes * reduction)))
        planes = int(math.floor(planes * reduction))
        self.block2 = DenseBlock(n, planes, growth)
        planes += n * growth
        self.trans2 = TransitionBlock(planes, int(math.floor(planes * reduction)))
        planes = int(math.floor(planes * reduction))
        self.block3 = DenseBlock(n, planes, growth)
        planes += n * growth
        self.bn1 = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():  # the authors' initialization
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


class _Features(nn.Module):
    """The backbone of a :class:`DenseNetBC`: input batch → pooled post-ReLU features (B×D)."""

    def __init__(self, net: DenseNetBC) -> None:
        super().__init__()
        self.conv1, self.block1, self.trans1 = net.conv1, net.block1, net.trans1
        self.block2, self.trans2, self.block3, self.bn1 = net.block2, net.trans2, net.block3, net.bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trans1(self.block1(self.conv1(x)))
        out = self.trans2(self.block2(out))
        out = F.relu(self.bn1(self.block3(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def build_densenet_bc100(num_classes: int, weights: str | Path | None = None) -> ModelAdapter:
    """DenseNet-BC-100 (growth 12) as an adapter; ``weights`` = a checkpoint file in the
    authors' layout (see the module docstring) or None for random initialization."""
    net = DenseNetBC(100, num_classes)
    if weights is not None:
        try:
            net.load_state_dict(load_state_dict_file(weights))
        except RuntimeError as exc:
            raise WeightsError(f"weights file {weights} does not fit densenet-bc-100 with {num_classes} classes: {exc}") from exc
    backbone = _Features(net)
    layers = {"block1": net.block1, "trans1": net.trans1, "block2": net.block2, "trans2": net.trans2, "block3": net.block3}
    return ModelAdapter("densenet-bc-100", backbone, net.fc, layers, "block3", DENSENET_BC_PREPROCESS).eval()
