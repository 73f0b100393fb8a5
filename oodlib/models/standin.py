"""``standin-imagenet``: a cheap stand-in with ResNet-50's ImageNet shapes, for scale benchmarks.

Penultimate features D = 2048 and C = 1000 classes like ResNet-50 on ImageNet, at a 16×16 RGB input
and a few million multiply-adds per image, so that a run over ImageNet's row counts measures the
pipeline (storage, shuffles, driver and worker memory, the detectors at D = 2048, C = 1000) rather
than the network. Architecture: ``block1`` conv3×3(3→32)-ReLU-maxpool2 (8×8) → ``block2``
conv3×3(32→64)-ReLU-maxpool2 (4×4) → ``block3`` conv3×3(64→2048)-ReLU (4×4) → global average pool
→ h (2048) → ``head`` Linear(2048→1000). The weights are a fixed seeded initialization (no
training: the predictions mean nothing). Meant for ``synthetic:<seed>`` manifest paths
(:data:`oodlib.data.decode.SYNTHETIC`).
"""
from __future__ import annotations

import torch
from torch import nn

from oodlib.data.preprocess import Preprocess
from oodlib.models.base import ModelAdapter

NAME = "standin-imagenet"
FEATURE_DIM, NUM_CLASSES = 2048, 1000
STANDIN_PREPROCESS = Preprocess(mode="RGB", size=(16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: the layers a detector's ``layers`` can name (none are defaults: give them in the config)
LAYERS = ("block1", "block2", "block3")


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_standin(num_classes: int = NUM_CLASSES, seed: int = 0) -> ModelAdapter:
    """The stand-in with its fixed seeded weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        block1, block2, block3 = _block(3, 32, True), _block(32, 64, True), _block(64, FEATURE_DIM, False)
        backbone = nn.Sequential(block1, block2, block3, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        head = nn.Linear(FEATURE_DIM, num_classes)
    return ModelAdapter(NAME, backbone, head, {"block1": block1, "block2": block2, "block3": block3}, "block3",
                        STANDIN_PREPROCESS).eval()
