"""The embedded default benchmark, built from data scikit-learn ships (no download).

* ID: handwritten digits 0–7 (``dataset="digits"``), stratified train/val/test (60/20/20).
* near-OOD: digits 8–9 (``digits-near``); far-OOD: patches of scikit-learn's sample photographs
  (``photo-patches``) and noise images (``noise``). OOD rows have ``label = -1``, split ``test``.
* ``photo-oe``: other patches of the same photographs (split ``train``), the auxiliary outlier set
  for outlier exposure — never used as a test OOD set.
* ``digits-c``: the ID test split under 4 corruptions × 3 severities (labels kept), where the
  model makes wrong predictions (accuracy ~0.95 → ~0.6 over severities, see
  :data:`SEVERITY_PARAMS`); ``subset`` names the corruption and severity (``blur-2``).
* ``digits-lt10`` / ``digits-lt100``: long-tailed subsets of the ID train split with the
  exponential profile n_k = n_max · ρ^(−k/(C−1)) (class 0 is the head; the first n_k images of
  each class, :func:`oodlib.data.longtail.long_tail_split`).

Images are 8×8 grey levels (0–16) upsampled to 32×32 uint8, so the same PNG decode path as real
data runs. Everything is a deterministic function of the seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from oodlib.data.longtail import long_tail_split

ID_CLASSES = tuple(range(8))
NEAR_OOD_CLASSES = (8, 9)
CORRUPTIONS = ("noise", "blur", "occlusion", "contrast")
SEVERITIES = (1, 2, 3)
IMAGE_SIZE = 32


@dataclass
class ImageSet:
    """Images of one dataset/split: ``images`` uint8 (N×32×32), ``labels`` int (N,), ids (N,),
    optionally per image a ``subset`` (e.g. a corruption) and a ``batch`` (e.g. the night it arrived)."""

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    subsets: list[str] = field(default_factory=list)
    #: per image: the batch it arrived in (incoming data: the night), or empty
    batches: list[str] = field(default_factory=list)


def _upsample(images8: np.ndarray) -> np.ndarray:
    """8×8 grey levels in [0, 16] → 32×32 uint8 (bilinear), N×32×32."""
    out = np.empty((len(images8), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, im in enumerate(images8):
        pil = Image.fromarray((im * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        out[i] = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return out


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (train, val, test), each class split by ``fractions`` (rounded per class)."""
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train : n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val :].tolist()
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)  # type: ignore[return-value]


#: Severity parameters, calibrated on digits-cnn like CIFAR-10-C's: accuracy falls from ~0.95 to
#: ~0.6 over severities 1–3 and no level collapses onto one predicted class (stronger settings —
#: noise σ ≥ 30, contrast ≤ 0.6 — make the model predict a single class for nearly every image,
#: where no error detector can rank errors above correct predictions).
SEVERITY_PARAMS = {
    "noise": (10.0, 15.0, 20.0),  # Gaussian noise σ in grey levels
    "blur": (1.5, 2.0, 2.25),  # Gaussian blur radius in pixels
    "occlusion": (8, 10, 12),  # side of a black square at a random position
    "contrast": (0.9, 0.8, 0.75),  # factor on the deviation from the image's mean
}


def corrupt(images: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply a corruption at severity 1–3 (:data:`SEVERITY_PARAMS`) to uint8 images (N×H×W); returns uint8."""
    if kind not in SEVERITY_PARAMS:
        raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")
    param = SEVERITY_PARAMS[kind][severity - 1]
    x = images.astype(np.float32)
    if kind == "noise":
        x = x + rng.normal(0.0, param, size=x.shape)
    elif kind == "blur":
        x = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(param)), np.float32) for im in images])
    elif kind == "occlusion":
        for im in x:
            r, c = rng.integers(0, IMAGE_SIZE - param + 1, size=2)
            im[r : r + param, c : c + param] = 0.0
    else:  # contrast
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * param + mean
    return np.clip(x, 0, 255).round().astype(np.uint8)


def photo_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` grey 32×32 patches cut at random scale from scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p).convert("L") for p in load_sample_images().images]
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(32, 160))
        left = int(rng.integers(0, photo.width - side))
        top = int(rng.integers(0, photo.height - side))
        crop = photo.crop((left, top, left + side, top + side))
        out[i] = np.asarray(crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return out


def noise_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` 32×32 noise images: half uniform, half blurred Gaussian blobs."""
    uniform = rng.integers(0, 256, size=(n - n // 2, IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)
    gauss = np.clip(rng.normal(128, 64, size=(n // 2, IMAGE_SIZE, IMAGE_SIZE)), 0, 255).astype(np.uint8)
    blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.5))) for im in gauss]
    return np.concatenate([uniform, np.stack(blurred)]) if blurred else uniform


def build_digits(seed: int = 0, n_photo: int = 400, n_noise: int = 400) -> list[ImageSet]:
    """Every image set of the embedded benchmark, deterministically from ``seed``."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    images = _upsample(digits.images)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))

    is_id = np.isin(labels, ID_CLASSES)
    id_idx = index[is_id]
    train, val, test = (id_idx[p] for p in stratified_split(labels[id_idx], (0.6, 0.2, 0.2), rng))

    def take(dataset: str, split: str, idx: np.ndarray, label: np.ndarray | None = None) -> ImageSet:
        lab = labels[idx] if label is None else label
        ids = [f"{dataset}/{split}/{int(i):05d}" for i in idx]
        return ImageSet(dataset, split, images[idx], lab, ids)

    sets = [take("digits", "train", train), take("digits", "val", val), take("digits", "test", test)]
    near = index[~is_id]
    sets.append(take("digits-near", "test", near, np.full(len(near), -1)))

    for name, arr in (("photo-patches", photo_patches(n_photo, rng)), ("noise", noise_images(n_noise, rng))):
        ids = [f"{name}/test/{i:05d}" for i in range(len(arr))]
        sets.append(ImageSet(name, "test", arr, np.full(len(arr), -1), ids))
    # auxiliary outliers for outlier exposure: other patches of the same photographs (split train),
    # kept apart from every test OOD set
    oe = photo_patches(n_photo, rng)
    sets.append(ImageSet("photo-oe", "train", oe, np.full(len(oe), -1), [f"photo-oe/train/{i:05d}" for i in range(len(oe))]))

    c_images, c_labels, c_ids, c_subsets = [], [], [], []
    for kind in CORRUPTIONS:
        for sev in SEVERITIES:
            c_images.append(corrupt(images[test], kind, sev, rng))
            c_labels.append(labels[test])
            c_ids += [f"digits-c/{kind}-{sev}/{int(i):05d}" for i in test]
            c_subsets += [f"{kind}-{sev}"] * len(test)
    sets.append(
        ImageSet("digits-c", "test", np.concatenate(c_images), np.concatenate(c_labels), c_ids, c_subsets)
    )

    for rho in (10, 100):
        lt = train[long_tail_split(labels[train], rho, val_per_class=0)[0]]
        sets.append(take(f"digits-lt{rho}", "train", lt))
    return sets
