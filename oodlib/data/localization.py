"""Localization ground truth for the embedded default: digits pasted onto photo backgrounds.

Each image is a ``canvas × canvas`` grey photo patch (scaled by ``background_scale``) with one ID test digit (32×32, the scale digits-cnn was trained at) pasted at
a random offset. The object mask is the digit's stroke pixels (value > ``stroke_threshold``) and
the box their bounding box. Everything is a deterministic function of the seed.

Canvas size: digits-cnn ends in adaptive average pooling, so larger canvases run, but it was
trained on frame-filling digits with shifts of ±2 px only, and it does not generalize to digits
placed elsewhere on a larger canvas. Measured accuracy (seed 0, 200 images, background scale
0.15): canvas 32 → 0.905, 36 → 0.715, 40 → 0.575 (48 → 0.34 at scale 0.1), against ≈ 0.95 on
clean test digits. Explanations of mostly wrong predictions would not test localization, so
the default canvas is 32 (the training scale) and the photo background, dimmed to 15 % so the
strokes keep their contrast, fills everything around the strokes: the mask (strokes) covers
≈ 45 % of the pixels, its box ≈ 72 %. Larger canvases stay available (``canvas``) for models
that are translation-robust. Inputs are normalized like the
digits model's (mean 0.5 / std 0.5 of [0, 1] grey values).
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from oodlib.data.decode import DecodeError, fit_geometry, input_pixels, load_pil, normalize
from oodlib.data.digits import IMAGE_SIZE, build_digits, photo_patches
from oodlib.data.preprocess import DIGITS_PREPROCESS, Preprocess

DEFAULT_CANVAS = 32


@dataclass
class LocalizationSet:
    """``images`` uint8 N×H×W (grey) or N×H×W×3 at the model's input size, ``labels`` (N,) the
    class to explain, ``masks`` bool N×H×W (the object: digit strokes, a segmentation mask, or the
    union of annotated boxes), ``boxes`` int N×4 (y0, x0, y1, x1; exclusive ends; the mask's
    bounding box), ``image_ids`` (N,), ``preprocess``: how ``images`` become model inputs."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    image_ids: list[str]
    preprocess: Preprocess = DIGITS_PREPROCESS

    def box_masks(self) -> np.ndarray:
        """The boxes as boolean masks (N×H×W)."""
        n, h, w = self.masks.shape
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        y0, x0, y1, x1 = (self.boxes[:, k, None, None] for k in range(4))
        return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1) & np.ones((n, 1, 1), bool)

    def inputs(self) -> np.ndarray:
        """Normalized model inputs (N×C×H×W float32, :attr:`preprocess`'s mean and std)."""
        return normalize(self.images, self.preprocess)


def build_localization(
    seed: int = 0,
    n: int = 200,
    canvas: int = DEFAULT_CANVAS,
    background_scale: float = 0.15,
    stroke_threshold: int = 64,
) -> LocalizationSet:
    """``n`` digits (ID test split of :func:`build_digits` ``seed``, cycled) pasted on photo patches."""
    if canvas < IMAGE_SIZE:
        raise ValueError(f"canvas must be at least {IMAGE_SIZE}; got {canvas}")
    rng = np.random.default_rng(seed + 7919)
    test = next(s for s in build_digits(seed, n_photo=1, n_noise=2) if s.dataset == "digits" and s.split == "test")
    pick = rng.permutation(len(test.labels))[np.arange(n) % len(test.labels)]
    digits = test.images[pick]
    background = (photo_patches(n, rng) * background_scale).astype(np.uint8)
    if canvas != IMAGE_SIZE:
        background = _resize(background, canvas)
    offsets = rng.integers(0, canvas - IMAGE_SIZE + 1, size=(n, 2))
    images = background.copy()
    masks = np.zeros((n, canvas, canvas), bool)
    rows = offsets[:, 0, None, None] + np.arange(IMAGE_SIZE)[None, :, None]
    cols = offsets[:, 1, None, None] + np.arange(IMAGE_SIZE)[None, None, :]
    idx = np.arange(n)[:, None, None]
    stroke = digits > stroke_threshold
    images[idx, rows, cols] = np.where(stroke, digits, images[idx, rows, cols])
    masks[idx, rows, cols] = stroke
    boxes = np.stack([_bbox(m) for m in masks])
    ids = [f"digits-loc/test/{i:05d}" for i in range(n)]
    return LocalizationSet(images, test.labels[pick].astype(np.int64), masks, boxes, ids)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 N×h×w images to N×size×size."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def _bbox(mask: np.ndarray) -> np.ndarray:
    """(y0, x0, y1, x1) of the True pixels (exclusive ends); zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(4, np.int64)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.int64)


def voc_boxes(xml_path: str | Path, names: set[str] | None = None) -> list[tuple[int, int, int, int]]:
    """Object boxes of a PASCAL VOC annotation file as (y0, x0, y1, x1), 0-based, exclusive ends
    (VOC's ``xmin … ymax`` are 1-based and inclusive); only objects whose ``name`` is in ``names``
    when given. Raises ``ValueError`` naming the file when it is not a VOC annotation."""
    try:
        root = ET.parse(xml_path).getroot()
        boxes = []
        for obj in root.iter("object"):
            if names is not None and obj.findtext("name", "").strip() not in names:
                continue
            bb = obj.find("bndbox")
            x0, y0, x1, y1 = (int(round(float(bb.findtext(k)))) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((y0 - 1, x0 - 1, y1, x1))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{xml_path}: not a PASCAL VOC annotation with object boxes ({exc})") from exc
    return boxes


def read_localization_list(list_file: str | Path) -> list[tuple[str, int, str | None]]:
    """Rows of a localization list file: ``path label [object_name]`` per line (whitespace or
    comma separated; ``#`` comments; paths relative to the file's folder). ``label`` is the class
    index to explain; ``object_name`` picks the VOC objects of that name (default: every object)."""
    list_file = Path(list_file)
    rows = []
    with open(list_file, newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = next(csv.reader([line])) if "," in line else line.split()
            parts = [p.strip() for p in parts]
            if len(parts) not in (2, 3) or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{list_file}:{lineno}: expected 'path label [object_name]', got {line!r}")
            path = Path(parts[0]) if Path(parts[0]).is_absolute() else list_file.parent / parts[0]
            rows.append((str(path), int(parts[1]), parts[2] if len(parts) == 3 else None))
    if not rows:
        raise ValueError(f"{list_file}: no images listed")
    return rows


def localization_from_files(
    list_file: str | Path, preprocess: Preprocess, masks_dir: str | Path | None = None,
    voc_dir: str | Path | None = None, limit: int | None = None,
) -> LocalizationSet:
    """Localization ground truth the user has on disk, brought to the model's input geometry.

    ``list_file``: see :func:`read_localization_list`. Exactly one of ``masks_dir`` (segmentation
    masks ``<image stem>.png``, non-zero = the object, e.g. ImageNet-S or the ImageNet
    segmentation subset) and ``voc_dir`` (PASCAL VOC ``Annotations/<image stem>.xml``, the object
    mask = the union of its boxes). Image and mask go through the same resize and center crop
    (:func:`~oodlib.data.decode.fit_geometry`; the mask with nearest-neighbour resampling), so the
    mask marks the object's pixels of the model's input. ``limit``: the first that many images.
    Raises ``ValueError`` naming the image or annotation that is missing, unreadable or empty.
    """
    if (masks_dir is None) == (voc_dir is None):
        raise ValueError("localization_from_files needs exactly one of masks_dir and voc_dir")
    rows = read_localization_list(list_file)[:limit]
    images, masks, labels, ids = [], [], [], []
    for path, label, name in rows:
        stem = Path(path).stem
        mpath = None if masks_dir is None else Path(masks_dir) / f"{stem}.png"
        if mpath is not None and not mpath.exists():
            raise ValueError(f"localization image {path}: no mask {mpath}")
        try:
            img = load_pil(None, path)
            m = None if mpath is None else load_pil(None, str(mpath))
        except DecodeError as exc:
            raise ValueError(f"localization image {path}: {exc}") from exc
        if m is not None:  # class indices (L, P, I) or colours (RGB); alpha is no label
            raw = np.asarray(m.convert("RGB") if m.mode in ("RGBA", "LA", "PA") else m)
            raw = (raw.reshape(*raw.shape[:2], -1) != 0).any(-1)
        else:
            boxes = voc_boxes(Path(voc_dir) / f"{stem}.xml", None if name is None else {name})
            raw = np.zeros((img.height, img.width), bool)
            for y0, x0, y1, x1 in boxes:
                raw[max(y0, 0) : y1, max(x0, 0) : x1] = True
        if raw.shape != (img.height, img.width):
            raise ValueError(f"localization image {path}: mask is {raw.shape[1]}×{raw.shape[0]}, image {img.width}×{img.height}")
        mask = np.asarray(fit_geometry(Image.fromarray(raw.astype(np.uint8) * 255), preprocess, Image.NEAREST)) > 0
        if not mask.any():
            raise ValueError(f"localization image {path}: the object mask is empty in the model's input crop")
        images.append(input_pixels(img, preprocess))
        masks.append(mask)
        labels.append(label)
        ids.append(path)
    masks_arr = np.stack(masks)
    return LocalizationSet(np.stack(images), np.asarray(labels, np.int64), masks_arr,
                           np.stack([_bbox(m) for m in masks_arr]), ids, preprocess)
