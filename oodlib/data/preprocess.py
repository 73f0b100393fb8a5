"""How decoded images become model input (:class:`Preprocess`), and the presets of the built-in
models and datasets. Used by :mod:`oodlib.data.decode`; every model adapter carries one (a data
concept: this package imports nothing from the models package)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    """How decoded images become model input.

    ``mode``: PIL mode the image is converted to ("L" or "RGB"); ``size``: (H, W) after resize;
    ``resize``: shorter side before the center crop (None = resize straight to ``size``);
    ``mean``/``std``: per-channel normalization of [0, 1] pixel values.
    """

    mode: str
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


DIGITS_PREPROCESS = Preprocess(mode="L", size=(32, 32), mean=(0.5,), std=(0.5,))
CIFAR_PREPROCESS = Preprocess(
    mode="RGB", size=(32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
IMAGENET_PREPROCESS = Preprocess(
    mode="RGB", size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize=256
)
#: DenseNet-BC-100 (CIFAR): the authors' normalization statistics.
DENSENET_BC_PREPROCESS = Preprocess(
    mode="RGB",
    size=(32, 32),
    mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
    std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
)
