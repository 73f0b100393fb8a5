"""How decoded images become model input (:class:`Preprocess`), and the presets of the built-in
models and datasets. Used by :mod:`oodlib.data.decode`; every model adapter carries one (a data
concept: this package imports nothing from the models package)."""
from __future__ import annotations

from dataclasses import dataclass, replace


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

#: named presets a config can start from (``model.preset``)
PRESETS: dict[str, Preprocess] = {
    "imagenet": IMAGENET_PREPROCESS, "cifar": CIFAR_PREPROCESS, "digits": DIGITS_PREPROCESS, "densenet-bc": DENSENET_BC_PREPROCESS,
}


def resolve_preprocess(
    default: Preprocess, preset: str | None = None, input_size: int | None = None, resize: int | None = None,
    crop: bool | None = None, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
) -> Preprocess:
    """``default`` (the model's own), replaced by a named ``preset``, then by the given fields:
    ``input_size`` (the square input), ``resize`` (shorter side before the center crop) and
    ``crop`` (False: resize straight to the input size), ``mean``/``std`` (one value per channel)."""
    pre = PRESETS[preset] if preset is not None else default
    changes: dict = {}
    if input_size is not None:
        changes["size"] = (int(input_size), int(input_size))
    if resize is not None:
        changes["resize"] = int(resize)
    if crop is False:
        changes["resize"] = None
    if mean is not None:
        changes["mean"] = tuple(float(m) for m in mean)
    if std is not None:
        changes["std"] = tuple(float(s) for s in std)
    pre = replace(pre, **changes)
    if len(pre.mean) != pre.channels or len(pre.std) != pre.channels:
        raise ValueError(f"mean/std need {pre.channels} value(s) for mode {pre.mode}, got {pre.mean} / {pre.std}")
    if pre.resize is not None and pre.resize < min(pre.size):
        raise ValueError(f"resize {pre.resize} is smaller than the {pre.size[0]}×{pre.size[1]} crop")
    return pre
