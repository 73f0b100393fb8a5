"""Fixture of the layer-statistics detector tests: a small random ResNet-18."""
from __future__ import annotations

import pytest
import torch

from oodlib.models import build_model


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18 with 4 classes and seeded random weights."""
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=4)
