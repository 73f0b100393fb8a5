"""Simulated nightly production batches from the embedded digits benchmark (no download).

Each batch (one per date) holds ``size`` images: ``round(share·size)`` "shifted" ones —
near-OOD digits 8–9 (label −1) and corrupted ID digits (label kept; a corruption of
:func:`oodlib.data.digits.corrupt` at a random kind and severity) split by ``near_fraction`` —
and ID test-like digits 0–7 for the rest. The batches are **partially labelled**: ID and corrupted
images keep their true label (as a labelling team would provide for some images), the
near-OOD ones have −1 (no ID class applies).

No image is a byte copy of a benchmark image. The digits data have no held-out pool (every
0–7 digit is in the ID train/val/test splits, every 8–9 in ``digits-near``), so every image is
drawn from the ID **test** split (never train or val: the model and the thresholds are fitted
there) or from ``digits-near`` and then **jittered** — a small random rotation (1°–4°, either
sign) and mild Gaussian pixel noise (σ = 2 grey levels) — like a fresh scan of the same digit.
The jitter stays below what the model's logits can tell apart from the ID splits (a classifier
two-sample test of jittered test vs val logits: AUC ≈ 0.48, p ≈ 0.65), so the ID part of a batch
is ID for the drift tests too. Stronger jitter is not: a shift by even one whole pixel moves the
digits off the 4-pixel grid of their 8→32 upsampling (AUC ≈ 0.6–0.68, p < 0.01 on 120 images),
and rotations up to 8° already lean that way (AUC ≈ 0.56). A byte copy, on the other hand, would
share its content hash with an evaluation row (content-keyed caches, dedup) and make the
"incoming" scores the test scores.

Deterministic: batch ``i`` uses ``numpy.random.default_rng([seed, blake2b(date)])``, so a batch
depends on the seed and its own date only (adding a date leaves the others unchanged). Ids are
``prod/<date>/<n>`` (n = position in the shuffled batch, 5 digits), dataset ``prod``, split
``test``; ``subsets`` says what each image is: ``id``, ``near-ood`` or ``<corruption>-<severity>``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from oodlib.data.digits import CORRUPTIONS, SEVERITIES, ImageSet, build_digits, corrupt

DATASET = "prod"
JITTER_DEGREES = (1.0, 4.0)
JITTER_NOISE = 2.0


def jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each uint8 image (N×H×W) by ±[1°, 4°] about its centre (bilinear) and add Gaussian
    noise σ = 2 grey levels; returns uint8 N×H×W."""
    out = np.empty_like(images)
    for i, im in enumerate(images):
        angle = rng.uniform(*JITTER_DEGREES) * rng.choice((-1.0, 1.0))
        pil = Image.fromarray(im).rotate(angle, resample=Image.BILINEAR)
        noisy = np.asarray(pil, np.float32) + rng.normal(0.0, JITTER_NOISE, size=im.shape)
        out[i] = np.clip(noisy, 0, 255).round().astype(np.uint8)
    return out


def _batch_rng(seed: int, date: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.blake2b(date.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([int(seed), digest])


def digits_incoming_batches(
    seed: int = 0,
    dates: Sequence[str] = ("2026-11-29", "2026-11-30", "2026-12-01"),
    size: int = 120,
    shares: Sequence[float] = (0.05, 0.2, 0.45),
    near_fraction: float = 0.5,
    sets: Sequence[ImageSet] | None = None,
) -> list[ImageSet]:
    """One :class:`~oodlib.data.digits.ImageSet` per date (in the order given; ``batches`` holds the
    date for every image), ``size`` images each, a
    ``shares[i]`` fraction of them shifted (near-OOD + corrupted, ``near_fraction`` of them
    near-OOD). ``sets``: the output of :func:`~oodlib.data.digits.build_digits` (built from
    ``seed`` when None). See the module docstring."""
    dates = [str(d) for d in dates]
    if len(dates) != len(shares):
        raise ValueError(f"{len(dates)} dates but {len(shares)} shares")
    if len(set(dates)) != len(dates):
        raise ValueError(f"dates repeat: {dates}")
    if any(not 0.0 <= s <= 1.0 for s in shares) or not 0.0 <= near_fraction <= 1.0:
        raise ValueError(f"shares and near_fraction must be in [0, 1], got {list(shares)}, {near_fraction}")
    by_key = {(s.dataset, s.split): s for s in (sets if sets is not None else build_digits(seed))}
    test, near = by_key[("digits", "test")], by_key[("digits-near", "test")]
    if size > len(test.images) or size > len(near.images):
        raise ValueError(f"size {size} exceeds the pools ({len(test.images)} ID test, {len(near.images)} near-OOD images)")
    out = []
    for date, share in zip(dates, shares):
        rng = _batch_rng(seed, date)
        n_shift = round(share * size)
        n_near = round(near_fraction * n_shift)
        n_corrupt = n_shift - n_near
        n_id = size - n_shift
        # ID and corrupted images come from distinct test digits within a batch
        pick = rng.permutation(len(test.images))[: n_id + n_corrupt]
        id_idx, c_idx = pick[:n_id], pick[n_id:]
        near_idx = rng.choice(len(near.images), size=n_near, replace=False)
        images = [jitter(test.images[id_idx], rng), jitter(near.images[near_idx], rng)]
        labels = [test.labels[id_idx], np.full(n_near, -1)]
        subsets = ["id"] * n_id + ["near-ood"] * n_near
        c_images = jitter(test.images[c_idx], rng)
        for j in range(n_corrupt):
            kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
            severity = SEVERITIES[int(rng.integers(len(SEVERITIES)))]
            c_images[j] = corrupt(c_images[j : j + 1], kind, severity, rng)[0]
            subsets.append(f"{kind}-{severity}")
        images.append(c_images)
        labels.append(test.labels[c_idx])
        order = rng.permutation(size)
        all_images = np.concatenate(images)[order]
        all_labels = np.concatenate(labels).astype(np.int64)[order]
        all_subsets = [subsets[i] for i in order]
        ids = [f"{DATASET}/{date}/{n:05d}" for n in range(size)]
        out.append(ImageSet(DATASET, "test", all_images, all_labels, ids, all_subsets, [date] * size))
    return out
