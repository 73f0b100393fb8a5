"""``digits-cnn``: a small CNN for the embedded digits benchmark, trained deterministically.

Architecture (input 1×32×32, normalized with mean 0.5 / std 0.5):
``block1`` conv3×3(1→16)-BN-ReLU-maxpool2 → ``block2`` conv3×3(16→32)-BN-ReLU-maxpool2 →
``block3`` conv3×3(32→64)-BN-ReLU (the last conv block, 8×8) → global average pool → h (64) →
``head`` Linear(64→8).

Training runs on first use (a few seconds on CPU) on the ID train split of
:func:`oodlib.data.digits.build_digits`, decoded through the same PNG path as the pipeline, and is
cached as safetensors under a key that hashes the training images, the recipe and this file's
version.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from oodlib.data.preprocess import DIGITS_PREPROCESS
from oodlib.models.base import ModelAdapter

#: Bump when the architecture or the training recipe changes (invalidates caches).
RECIPE = {"version": 1, "epochs": 30, "lr": 3e-3, "batch_size": 64, "weight_decay": 5e-4, "seed": 0}
NUM_CLASSES = 8


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_digits_cnn(num_classes: int = NUM_CLASSES) -> ModelAdapter:
    """An untrained digits-cnn adapter (deterministic init under the caller's seed)."""
    block1, block2, block3 = conv_block(1, 16, True), conv_block(16, 32, True), conv_block(32, 64, False)
    backbone = nn.Sequential(block1, block2, block3, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(64, num_classes)
    return ModelAdapter(
        "digits-cnn",
        backbone,
        head,
        layers={"block1": block1, "block2": block2, "block3": block3},
        default_layer="block3",
        preprocess=DIGITS_PREPROCESS,
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("OODLIB_CACHE", Path.home() / ".cache" / "oodlib"))


def train_digits_cnn(x: torch.Tensor, y: torch.Tensor, recipe: dict = RECIPE) -> ModelAdapter:
    """Train a digits-cnn on normalized inputs ``x`` (N×1×32×32) and labels ``y`` (N,), on CPU.

    Deterministic: fixed seed, CPU kernels, a seeded shuffling generator.
    """
    torch.manual_seed(recipe["seed"])
    model = build_digits_cnn()
    gen = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe["epochs"])
    model.train()
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), recipe["batch_size"]):
            idx = order[i : i + recipe["batch_size"]]
            # light augmentation: random shifts of up to 2 pixels
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def digits_training_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ID train split of the embedded benchmark, PNG-encoded and decoded as the pipeline does."""
    from oodlib.data.decode import decode_batch
    from oodlib.data.digits import build_digits
    from oodlib.data.manifest import encode_png

    train = next(s for s in build_digits(seed) if s.dataset == "digits" and s.split == "train")
    x, reasons = decode_batch([encode_png(im) for im in train.images], [None] * len(train.images), DIGITS_PREPROCESS)
    assert all(r is None for r in reasons)
    return x, torch.as_tensor(train.labels, dtype=torch.long)


def training_fingerprint(seed: int = 0) -> str:
    """What the trained weights are a function of, read without building the training set: the
    recipe, the seed, the code that makes, encodes and decodes the training images, scikit-learn's
    bundled digits file and the NumPy/Pillow versions. A cached re-run then skips the seconds that
    building the images (and importing scikit-learn) cost."""
    import importlib.util

    import PIL

    from oodlib.data import decode, digits, longtail, manifest

    digest = hashlib.sha256(json.dumps(
        {"recipe": RECIPE, "seed": seed, "preprocess": repr(DIGITS_PREPROCESS), "numpy": np.__version__, "pillow": PIL.__version__},
        sort_keys=True,
    ).encode())
    for module in (digits, decode, longtail, manifest):
        digest.update(Path(module.__file__).read_bytes())
    sklearn_dir = Path(importlib.util.find_spec("sklearn").origin).parent  # found, not imported
    digest.update((sklearn_dir / "datasets" / "data" / "digits.csv.gz").read_bytes())
    return digest.hexdigest()[:16]


def trained_digits_cnn(seed: int = 0, cache_dir: str | Path | None = None) -> ModelAdapter:
    """The trained digits-cnn: loaded from the cache, or trained (seconds) and cached."""
    path = Path(cache_dir or default_cache_dir()) / f"digits-cnn-{training_fingerprint(seed)}.safetensors"
    model = build_digits_cnn()
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    x, y = digits_training_data(seed)
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        model = train_digits_cnn(x, y)
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model
