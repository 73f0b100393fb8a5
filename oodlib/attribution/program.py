"""A classifier as a flat program of propagation ops, and its recorded forward pass.

:func:`build_program` turns a :class:`~oodlib.models.base.ModelAdapter` (backbone + linear head)
into a list of ops that every relevance rule walks backwards:

* :class:`ConvOp` — ``Conv2d`` with the ``BatchNorm2d`` that follows it (kept separate: LRP rules
  use the folded weights, RAP/AE use the raw convolution weight with BatchNorm as identity);
* :class:`LinearOp` — ``Linear`` (the adapter's head is flagged ``head=True``);
* :class:`PoolOp` — max pooling (relevance routed to the arg-max) and average / adaptive average
  pooling (z-rule);
* :class:`ResidualOp` — a torchvision ``Bottleneck``/``BasicBlock`` as ``branch(x) + shortcut(x)``
  (shortcut = downsample conv+BN, or the identity), followed by a :class:`ReLUOp`;
* :class:`ReLUOp`, :class:`FlattenOp`; ``Dropout``/``Identity`` are dropped (eval mode).

Any other module raises :class:`UnsupportedLayerError` naming the module and its type.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedLayerError(TypeError):
    """The model holds a layer that relevance propagation does not support."""


@dataclass(eq=False)
class ConvOp:
    """``bn(conv(x))``. ``first`` marks the layer that receives the image (z^β rule);
    ``nonneg_input``: its input is ≥ 0 by construction (follows a ReLU, possibly through pooling)."""

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None = None
    first: bool = False
    nonneg_input: bool = False
    _split: tuple | None = field(default=None, repr=False)

    @property
    def weight(self) -> torch.Tensor:
        """Raw convolution weight (Co×Ci×kh×kw)."""
        return self.conv.weight.detach()

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the convolution with its BatchNorm folded in (eval statistics)."""
        w = self.weight
        b = self.conv.bias.detach() if self.conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if self.bn is None:
            return w, b
        scale = self.bn.weight.detach() / torch.sqrt(self.bn.running_var + self.bn.eps)
        return w * scale[:, None, None, None], (b - self.bn.running_mean) * scale + self.bn.bias.detach()

    def conv2d(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` convolved with ``w`` using this layer's stride/padding/dilation (no bias)."""
        c = self.conv
        return F.conv2d(x, w, None, c.stride, c.padding, c.dilation)

    def conv2d_t(self, s: torch.Tensor, w: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        """Transposed convolution of ``s`` (B×Co×h×w) with ``w`` back to ``x_shape`` (B×Ci×H×W), with
        the output padding that restores H×W."""
        c = self.conv
        pad = [
            size - ((n - 1) * st - 2 * p + d * (k - 1) + 1)
            for size, n, st, p, d, k in zip(x_shape[2:], s.shape[2:], c.stride, c.padding, c.dilation, w.shape[2:])
        ]
        return F.conv_transpose2d(s, w, None, c.stride, c.padding, pad, 1, c.dilation)

    def split_weight(self) -> torch.Tensor:
        """Stacked [w⁺; |w⁻|] (2Co×Ci×kh×kw) of the raw weight, computed once and kept until the weight
        changes (an in-place update bumps its version; a new tensor has a new address). On CPU it is
        stored channels-last like the split forward's activations (:func:`run`): otherwise every
        convolution and transposed convolution copies it into that layout first."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._split is None or self._split[0] != key:
            ws = torch.cat([w.clamp(min=0), w.clamp(max=0).neg_()])
            if ws.device.type == "cpu":
                ws = ws.contiguous(memory_format=torch.channels_last)
            self._split = (key, ws)
        return self._split[1]

    def post(self, z: torch.Tensor) -> torch.Tensor:
        """Conv bias and BatchNorm applied to the bias-free convolution output ``z``."""
        if self.conv.bias is not None:
            z = z + self.conv.bias.detach()[:, None, None]
        return self.bn(z) if self.bn is not None else z

    @property
    def pointwise(self) -> bool:
        return tuple(self.conv.kernel_size) == (1, 1)


@dataclass(eq=False)
class LinearOp:
    name: str
    linear: nn.Linear
    head: bool = False

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight C×D, bias C) — zeros when the layer has no bias."""
        w = self.linear.weight.detach()
        b = self.linear.bias.detach() if self.linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return w, b


@dataclass(eq=False)
class PoolOp:
    name: str
    module: nn.Module
    kind: str  # "max" or "avg"


@dataclass(eq=False)
class ReLUOp:
    name: str


@dataclass(eq=False)
class FlattenOp:
    name: str


@dataclass(eq=False)
class ResidualOp:
    """``branch(x) + shortcut(x)``; an empty ``shortcut`` is the identity."""

    name: str
    branch: list = field(default_factory=list)
    shortcut: list = field(default_factory=list)


Op = ConvOp | LinearOp | PoolOp | ReLUOp | FlattenOp | ResidualOp


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every non-Sequential module, depth first, Sequentials flattened."""
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


def _resnet_blocks() -> tuple[type, type]:
    """torchvision's (Bottleneck, BasicBlock), imported on first use: importing torchvision takes
    seconds that a job validating its config (the method names) should not pay."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return Bottleneck, BasicBlock


def _block_ops(name: str, block: nn.Module) -> list:
    """A torchvision residual block as [ResidualOp, ReLUOp]."""
    if isinstance(block, _resnet_blocks()[0]):
        parts = ["conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"]
    else:
        parts = ["conv1", "bn1", "relu", "conv2", "bn2"]
    relus = iter(range(1, 3))
    branch = _compile([(f"{name}.{p}{next(relus)}" if p == "relu" else f"{name}.{p}", getattr(block, p)) for p in parts])
    shortcut = _compile(_leaves(block.downsample, f"{name}.downsample")) if block.downsample is not None else []
    return [ResidualOp(name, branch, shortcut), ReLUOp(f"{name}.relu_out")]


def _compile(items: list[tuple[str, nn.Module]]) -> list:
    ops: list = []
    i = 0
    while i < len(items):
        name, m = items[i]
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise UnsupportedLayerError(f"layer {name!r}: grouped Conv2d (groups={m.groups}) is not supported")
            bn = items[i + 1][1] if i + 1 < len(items) and isinstance(items[i + 1][1], nn.BatchNorm2d) else None
            ops.append(ConvOp(name, m, bn))
            i += 2 if bn is not None else 1
            continue
        if isinstance(m, _resnet_blocks()):
            ops += _block_ops(name, m)
        elif isinstance(m, nn.ReLU):
            ops.append(ReLUOp(name))
        elif isinstance(m, nn.MaxPool2d):
            ops.append(PoolOp(name, m, "max"))
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            ops.append(PoolOp(name, m, "avg"))
        elif isinstance(m, nn.Flatten):
            ops.append(FlattenOp(name))
        elif isinstance(m, nn.Linear):
            ops.append(LinearOp(name, m))
        elif not isinstance(m, (nn.Dropout, nn.Identity)):
            raise UnsupportedLayerError(
                f"layer {name!r} of type {type(m).__name__} is not supported by relevance propagation "
                "(supported: Conv2d[+BatchNorm2d], Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, "
                "Flatten, Dropout, torchvision Bottleneck/BasicBlock)"
            )
        i += 1
    return ops


def build_program(model: nn.Module) -> list:
    """The propagation ops of an adapter (``backbone`` then ``head``), first conv flagged.

    Raises :class:`UnsupportedLayerError` naming the first unsupported module.
    """
    ops = _compile(_leaves(model.backbone, "backbone") + [("head", model.head)])
    if not isinstance(ops[-1], LinearOp):
        raise UnsupportedLayerError("the model's head must be an nn.Linear")
    ops[-1].head = True
    first = ops[0]
    if not isinstance(first, ConvOp):
        raise UnsupportedLayerError(f"the first layer {first.name!r} must be a Conv2d (z^β input rule)")
    first.first = True
    _mark_nonneg(ops, False)
    return ops


def _mark_nonneg(ops: list, nonneg: bool) -> bool:
    """Set ``ConvOp.nonneg_input`` from the structure (ReLU → ≥ 0, pooling keeps the sign, conv /
    linear / residual sum do not); ``nonneg``: whether the input of ``ops`` is ≥ 0. Returns the
    same for their output."""
    for op in ops:
        if isinstance(op, ResidualOp):
            _mark_nonneg(op.branch, nonneg)
            _mark_nonneg(op.shortcut, nonneg)
            nonneg = False
        elif isinstance(op, ConvOp):
            op.nonneg_input, nonneg = nonneg, False
        elif isinstance(op, ReLUOp):
            nonneg = True
        elif isinstance(op, LinearOp):
            nonneg = False
    return nonneg


def gap_index(ops: list) -> int:
    """Index of the last average-pooling op at top level (input = the map before global pooling)."""
    idx = [i for i, op in enumerate(ops) if isinstance(op, PoolOp) and op.kind == "avg"]
    if not idx:
        raise UnsupportedLayerError("the model has no global average pooling layer")
    return idx[-1]


@dataclass
class ConvCache:
    """What a conv rule needs: input ``x`` and, in split mode, the stacked weights w = [w⁺; |w⁻|]
    (2Co×Ci×kh×kw), Z⁺ = conv(x, w⁺) and |Z⁻| = −conv(x, w⁻) (B×Co×h×w views of one tensor)."""

    x: torch.Tensor
    zp: torch.Tensor | None = None
    zn: torch.Tensor | None = None
    w: torch.Tensor | None = None


def run(ops: list, x: torch.Tensor, split: bool = False) -> tuple[torch.Tensor, list]:
    """Forward through ``ops`` recording what the backward rules need.

    ``split``: hidden convolutions compute Z⁺ and |Z⁻| (raw weights, no bias) in one convolution
    with stacked weights [w⁺; |w⁻|] and form the pre-activation as Z⁺ − |Z⁻| (RAP's denominators).
    Residual ops record (branch cache, shortcut cache, branch output, shortcut output, their sum).
    In split mode on CPU, image batches run channels-last (the recorded tensors have that layout).
    Returns (output, cache list aligned with ``ops``).
    """
    if split and x.ndim == 4 and x.device.type == "cpu":
        # oneDNN's CPU convolutions (forward and transposed) run 1.2–2.5× faster on channels-last
        # (NHWC) tensors; every later activation keeps the layout. No-op on recursive calls. Split
        # mode only: the LRP rules keep the plain layout and with it zennit's rounding (LRP-ε's
        # small denominators amplify the kernels' rounding differences).
        x = x.contiguous(memory_format=torch.channels_last)
    cache: list = []
    fresh = False  # x was made by the previous op and is not recorded: a ReLU may overwrite it
    for op in ops:
        if isinstance(op, ResidualOp):
            ya, ca = run(op.branch, x, split)
            yb, cb = run(op.shortcut, x, split) if op.shortcut else (x, [])
            x = ya + yb
            cache.append((ca, cb, ya, yb, x))
        elif isinstance(op, ConvOp):
            if split and not op.first:
                ws = op.split_weight()
                zz = op.conv2d(x, ws)
                zp, zn = zz[:, : len(ws) // 2], zz[:, len(ws) // 2 :]
                cache.append(ConvCache(x, zp, zn, ws))
                x = op.post(zp - zn)
            else:
                cache.append(ConvCache(x))
                x = op.post(op.conv2d(x, op.weight))
        elif isinstance(op, LinearOp):
            cache.append(x)
            x = op.linear(x)
        elif isinstance(op, PoolOp):
            cache.append(x)
            x = op.module(x)
        elif isinstance(op, ReLUOp):
            cache.append(None)
            x = F.relu(x, inplace=fresh)
        elif isinstance(op, FlattenOp):
            cache.append(x.shape)
            x = x.flatten(1)
        fresh = isinstance(op, (ConvOp, LinearOp, PoolOp))
    return x, cache
