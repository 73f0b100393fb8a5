"""Gaussianization: re-estimate a frozen backbone's BatchNorm statistics on the (long-tailed) ID
training data, so that every BN layer's pre-affine output is ≈ N(0, 1) on that data.

* :func:`recalibrate_bn` — a copy of the model whose BN running mean/var are the cumulative
  average (``momentum=None``) of the per-batch statistics over the calibration batches, with all
  weights (BN affine included) unchanged. Each batch weighs equally, so use equal batch sizes
  (the last batch may be smaller); a single batch gives that batch's exact mean and unbiased var.
* :func:`gaussianize` — optional BN fine-tuning (paper: 20 epochs, lr 1e-3; BN affine parameters
  and, by default, the head are trained with cross-entropy, everything else frozen), followed by
  the recalibration pass so the stored statistics match the final weights.
* :func:`bn_state` / :func:`save_bn_state` / :func:`load_bn_state` — persist only the BN tensors
  (safetensors, a few kB–MB) instead of a whole model copy.
* :func:`paired_features` — original and Gaussianized features of one input batch, running the
  leading modules that contain no BatchNorm once.

Cost in EMBED: the Gaussianized features need a second forward pass; the shared prefix saves the
stem convolution only (ResNet-18 at 224²: conv1 ≈ 118 of 1,820 MFLOPs, ≈ 6%), because the first
BN follows the first convolution — so budget ≈ 1.9× the single-model forward.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from oodlib.device import resolve_device
from oodlib.models.base import ModelAdapter

Batches = torch.Tensor | Iterable[torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]]


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm module of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _iter_batches(data: Batches, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x, y or None) batches from a tensor N×… (split into ``batch_size`` rows) or an iterable of
    tensors / (x, y, …) tuples (e.g. a DataLoader)."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size], None
        return
    for item in data:
        if isinstance(item, (tuple, list)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


@torch.no_grad()
def recalibrate_bn(
    model: ModelAdapter, data: Batches, batch_size: int = 256, device: str | torch.device = "auto"
) -> ModelAdapter:
    """A copy of ``model`` (eval mode, on ``device``) with BN running statistics re-estimated on ``data``.

    Args:
        model: the frozen backbone adapter (left unchanged).
        data: normalized inputs, a tensor N×C×H×W or an iterable of batches / (x, y) tuples.
        batch_size: rows per forward pass when ``data`` is a tensor.
    Returns:
        the recalibrated copy (frozen: no parameter requires grad); running_mean/var = cumulative average over batches of the batch
        mean / unbiased batch variance (``momentum=None``); ``num_batches_tracked`` = batch count.
    """
    dev = resolve_device(device)
    new = copy.deepcopy(model).to(dev).eval().requires_grad_(False)
    layers = bn_layers(new)
    if not layers:
        raise ValueError(f"model {model.name!r} has no BatchNorm layer to recalibrate")
    momenta = {name: m.momentum for name, m in layers.items()}
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for x, _ in _iter_batches(data, batch_size):
        new.features(x.to(dev, non_blocking=True))
        seen += len(x)
    if seen < 2:
        raise ValueError("BN recalibration needs at least 2 calibration images")
    for name, m in layers.items():
        m.momentum = momenta[name]
    return new.eval()


@torch.enable_grad()
def finetune_bn(
    model: ModelAdapter,
    data: Batches,
    labels: torch.Tensor | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    train_head: bool = True,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> ModelAdapter:
    """A copy of ``model`` whose BN affine parameters (and head, if ``train_head``) are fine-tuned
    with cross-entropy for ``epochs`` epochs (Adam, ``lr``); all other weights stay frozen.

    ``data`` is a tensor N×C×H×W with ``labels`` (N,) (shuffled with ``seed`` each epoch) or an
    iterable of (x, y) batches (re-iterated each epoch). BN layers run in train mode (batch
    statistics); call :func:`recalibrate_bn` afterwards (``gaussianize`` does).
    """
    dev = resolve_device(device)
    new = copy.deepcopy(model).to(dev)
    for p in new.parameters():
        p.requires_grad_(False)
    params = [p for m in bn_layers(new).values() for p in m.parameters()]
    if train_head:
        params += list(new.head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    new.eval()
    for m in bn_layers(new).values():
        m.train()
    for _ in range(epochs):
        if isinstance(data, torch.Tensor):
            if labels is None:
                raise ValueError("fine-tuning on a tensor needs labels")
            order = torch.randperm(len(data), generator=gen)
            batches = ((data[order[i : i + batch_size]], labels[order[i : i + batch_size]])
                       for i in range(0, len(data), batch_size))
        else:
            batches = _iter_batches(data, batch_size)
        for x, y in batches:
            loss = nn.functional.cross_entropy(new(x.to(dev)), torch.as_tensor(y, device=dev).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in new.parameters():
        p.requires_grad_(False)
    return new.eval()


def gaussianize(
    model: ModelAdapter,
    data: Batches,
    labels: torch.Tensor | None = None,
    epochs: int = 0,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> ModelAdapter:
    """The Gaussianized copy of ``model``: optional BN fine-tuning (``epochs`` > 0, needs labels),
    then BN statistics re-estimated on ``data`` (see :func:`recalibrate_bn`)."""
    if epochs > 0:
        model = finetune_bn(model, data, labels, epochs, lr, batch_size, seed=seed, device=device)
    return recalibrate_bn(model, data, batch_size, device)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BN tensors of ``model`` (running stats, counters and affine parameters), CPU, by state-dict key."""
    names = tuple(f"{n}." for n in bn_layers(model))
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(names)}


def save_bn_state(model: nn.Module, path: str | Path) -> None:
    """Write :func:`bn_state` (plus the head, which fine-tuning may change) as safetensors."""
    state = bn_state(model)
    if isinstance(model, ModelAdapter):
        state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()})
    save_file(state, str(path))


def load_bn_state(model: ModelAdapter, path: str | Path) -> ModelAdapter:
    """A copy of ``model`` (eval) with the BN (and head) tensors from :func:`save_bn_state`'s file."""
    new = copy.deepcopy(model)
    state = load_file(str(path))
    expected = set(bn_state(new)) | {f"head.{k}" for k in new.head.state_dict()}
    if set(state) != expected:
        raise ValueError(f"BN state file {path} does not match model {model.name!r}")
    new.load_state_dict(state, strict=False)
    return new.eval()


def _flat_modules(module: nn.Module) -> list[nn.Module]:
    """``module`` as the flat list of modules it applies in order (nested Sequentials expanded)."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flat_modules(child)]
    return [module]


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def paired_features(
    original: ModelAdapter, gaussianized: ModelAdapter, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one normalized batch under both models: (h B×D, g B×D).

    The leading backbone modules that contain no BatchNorm and have identical weights (e.g. the
    stem convolution) run once; both models must be in eval mode on ``x``'s device.
    """
    mods_a, mods_b = _flat_modules(original.backbone), _flat_modules(gaussianized.backbone)
    shared = 0
    while (
        shared < min(len(mods_a), len(mods_b))
        and not bn_layers(mods_a[shared])
        and _same(mods_a[shared], mods_b[shared])
    ):
        shared += 1
    for m in mods_a[:shared]:
        x = m(x)
    h, g = x, x
    for m in mods_a[shared:]:
        h = m(h)
    for m in mods_b[shared:]:
        g = m(g)
    return h, g
