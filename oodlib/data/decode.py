"""Decode encoded images into normalized model input, or say why not.

:func:`decode_batch` never raises for a bad image: it returns the reason per image so the caller
can quarantine it, and the batch goes on.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

from oodlib.data.preprocess import Preprocess

#: Larger images are refused as decompression bombs (PIL warns at 89 Mpx, errors at twice that).
MAX_PIXELS = 64_000_000
#: Larger encoded images are refused before they are read whole (the job's ``data.max_image_bytes``).
MAX_BYTES = 64 * 2**20


#: ``path`` values ``synthetic:<seed>`` decode, without any file, to a deterministic random image:
#: uniform uint8 pixels at the model's input size from ``numpy.random.default_rng(<seed>)`` — a few
#: microseconds a row. For scale benchmarks of the pipeline's mechanics (``benchmarks/bench_scale.py``:
#: ImageNet's row counts without ImageNet's decoding cost); a bad seed is quarantined.
SYNTHETIC = "synthetic:"


class DecodeError(ValueError):
    """An image that cannot be decoded; the message is the quarantine reason."""


def load_pil(data: bytes | None, path: str | None, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Open and fully decode one image from bytes or a path; raise :class:`DecodeError`.

    A file over ``max_bytes`` is refused from its size, before it is read."""
    if data is None:
        if not path:
            raise DecodeError("no image bytes and no path")
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > max_bytes:
                    raise DecodeError(f"file of {size} bytes is over the {max_bytes}-byte cap (data.max_image_bytes)")
                data = fh.read()
        except OSError as exc:
            raise DecodeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise DecodeError(f"{len(data)} image bytes are over the {max_bytes}-byte cap (data.max_image_bytes)")
    if len(data) == 0:
        raise DecodeError("zero-length image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise DecodeError(f"decompression bomb: {img.width}x{img.height} pixels > {MAX_PIXELS}")
            img.load()
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError …)
        raise DecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from exc
    return img


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode (palette, RGBA, CMYK, 16-bit, float) to ``"L"`` or ``"RGB"``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


def fit_geometry(img: Image.Image, pre: Preprocess, resample: int = Image.BILINEAR) -> Image.Image:
    """Resize (shorter side to ``pre.resize``, then torchvision's CenterCrop to ``pre.size``), or
    resize straight to ``pre.size``. ``resample=Image.NEAREST`` moves a label mask exactly as the
    image moves (localization ground truth)."""
    if pre.resize is not None:
        scale = pre.resize / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
        top = int(round((img.height - pre.size[0]) / 2.0))
        left = int(round((img.width - pre.size[1]) / 2.0))
        return img.crop((left, top, left + pre.size[1], top + pre.size[0]))
    if img.size != (pre.size[1], pre.size[0]):
        img = img.resize((pre.size[1], pre.size[0]), resample)
    return img


def input_pixels(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """The model's input pixels before normalization: ``pre.mode``, resized (and center-cropped);
    uint8 H×W (grey) or H×W×C."""
    return np.asarray(fit_geometry(to_mode(img, pre.mode), pre), dtype=np.uint8)


def preprocess_pil(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize (and center-crop), scale to [0, 1], normalize: float32 C×H×W."""
    return normalize(input_pixels(img, pre), pre)


def normalize(pixels: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 pixels at ``pre``'s size — H×W (grey) or H×W×C, or a batch of them — → float32 C×H×W
    (N×C×H×W): scaled to [0, 1], minus ``pre.mean``, over ``pre.std``."""
    arr = np.asarray(pixels, dtype=np.float32) / 255.0
    arr = np.moveaxis(arr[..., None] if pre.channels == 1 else arr, -1, -3)
    mean = np.asarray(pre.mean, np.float32)[:, None, None]
    std = np.asarray(pre.std, np.float32)[:, None, None]
    return (arr - mean) / std


def synthetic_pixels(path: str, pre: Preprocess) -> np.ndarray:
    """The pixels (uint8 at ``pre.size``) of a ``synthetic:<seed>`` path (see :data:`SYNTHETIC`)."""
    try:
        seed = int(path[len(SYNTHETIC):])
    except ValueError:
        raise DecodeError(f"synthetic image {path!r}: the seed is not an integer") from None
    shape = tuple(pre.size) if pre.channels == 1 else (*pre.size, pre.channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def decode_batch(
    images: list[bytes | None], paths: list[str | None], pre: Preprocess, max_bytes: int = MAX_BYTES,
) -> tuple[torch.Tensor, list[str | None]]:
    """Decode a batch.

    Returns ``(x, reasons)``: ``x`` is float32 (n_ok×C×H×W) for the images that decoded, in
    order; ``reasons[i]`` is ``None`` for a good image and the quarantine reason otherwise.
    """
    arrays, reasons = [], []
    for data, path in zip(images, paths):
        try:
            if data is None and path is not None and path.startswith(SYNTHETIC):
                arr = normalize(synthetic_pixels(path, pre), pre)
            else:
                arr = preprocess_pil(load_pil(data, path, max_bytes), pre)
            if not np.isfinite(arr).all():
                raise DecodeError("non-finite pixel values after preprocessing")
        except DecodeError as exc:
            reasons.append(str(exc))
            continue
        arrays.append(arr)
        reasons.append(None)
    shape = (0, pre.channels, *pre.size)
    x = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(shape)
    return x, reasons
