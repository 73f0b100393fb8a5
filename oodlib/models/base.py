"""Model adapter: a classifier split into ``features(x) -> h`` and a linear ``head``.

Every method in oodlib works on this split. ``h`` is the penultimate activation (B×D, after global
pooling, post-ReLU for the built-in CNNs) and ``logits = head(h) = h @ W.T + b`` (B×C).
Named internal layers (``adapter.layer(name)``) are the modules used by conductance,
Gaussianization and attribution; ``default_layer`` is the last convolutional block.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from oodlib.data.preprocess import Preprocess


class ModelAdapter(nn.Module):
    """A classifier as ``head(backbone(x))`` with named internal layers.

    Args:
        name: model name (e.g. ``"resnet18"``).
        backbone: module mapping a normalized input batch (B×3×H×W) to features h (B×D).
        head: the final ``nn.Linear`` (C×D weight, C bias).
        layers: named internal modules (each a submodule of ``backbone``), in forward order.
        default_layer: the layer used when a method does not name one (last conv block).
        preprocess: how to turn decoded images into input tensors.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        head: nn.Linear,
        layers: dict[str, nn.Module],
        default_layer: str,
        preprocess: Preprocess,
    ) -> None:
        super().__init__()
        if default_layer not in layers:
            raise ValueError(f"default_layer {default_layer!r} is not one of {sorted(layers)}")
        self.name = name
        self.backbone = backbone
        self.head = head
        self._layer_names = {id(m): n for n, m in layers.items()}
        self._layers = dict(layers)
        self.default_layer = default_layer
        self.preprocess = preprocess

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features h (B×D) of a normalized input batch."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B×C)."""
        return self.head(self.backbone(x))

    def layer(self, name: str | None = None) -> nn.Module:
        """The internal module called ``name`` (default: :attr:`default_layer`)."""
        name = name or self.default_layer
        if name not in self._layers:
            raise KeyError(f"model {self.name!r} has no layer {name!r}; known: {sorted(self._layers)}")
        return self._layers[name]

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def head_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(W [C×D], b [C]) as float32 NumPy arrays."""
        w = self.head.weight.detach().cpu().numpy().astype(np.float32)
        b = (
            self.head.bias.detach().cpu().numpy().astype(np.float32)
            if self.head.bias is not None
            else np.zeros(self.num_classes, np.float32)
        )
        return w, b

    def weights_hash(self) -> str:
        """SHA-256 (hex, 16 chars) of the model name and every parameter and buffer."""
        return state_dict_hash(self.state_dict(), prefix=self.name)


def state_dict_hash(state: dict[str, torch.Tensor], prefix: str = "") -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256(prefix.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
