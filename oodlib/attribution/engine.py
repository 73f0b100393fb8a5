"""Batched relevance propagation: forward once, then walk the program backwards with one rule
(on CPU in sweeps of :data:`CPU_CHUNK` images, see :func:`propagate`).

Layer-independent steps (shared by every rule):
* ReLU, Dropout, BatchNorm (inside :class:`~oodlib.attribution.program.ConvOp` for RAP/AE): identity;
* max pooling: relevance routed to the arg-max input (equals the z-rule, which gives the winner
  x_max/z · R = R; it also keeps relevance sitting on zero activations, which AE's U term puts there);
* average pooling: z-rule R_i = x_i · Σ_j (∂z_j/∂x_i) R_j / z_j;
* residual add: z-rule, each branch gets its signed share a/(a+b) · R.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oodlib.attribution.program import (
    ConvOp,
    FlattenOp,
    LinearOp,
    PoolOp,
    ReLUOp,
    ResidualOp,
    build_program,
    gap_index,
    run,
)
from oodlib.attribution.rules import AttributionEquilibrium, safe_div

#: Images per forward/backward sweep on CPU (see :func:`propagate`).
CPU_CHUNK = 4


def _maxpool_route(module: torch.nn.MaxPool2d, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Route R (B×C×h×w) to the arg-max positions of ``x`` (overlapping windows accumulate): max
    pooling's own backward kernel, which keeps x's memory layout."""
    args = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    _, idx = F.max_pool2d(x, *args, return_indices=True)
    return torch.ops.aten.max_pool2d_with_indices_backward(R, x, *args, idx)


def _avgpool_z(module: torch.nn.Module, x: torch.Tensor, R: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """z-rule through a (linear) average pooling, one batched vector-Jacobian product; ``eps``: the
    stabilizer of the division R / z (:func:`~oodlib.attribution.rules.safe_div`)."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        z = module(xr)
        (g,) = torch.autograd.grad(z, xr, safe_div(R, z.detach(), eps))
    return x * g


def backprop(ops: list, cache: list, R: torch.Tensor, rule, target: torch.Tensor, record: dict | None = None):
    """Propagate relevance ``R`` (at the output of ``ops``) to their input.

    The rule's division stabilizer ``rule.eps`` (RAP; the authors' code stabilizes every division)
    also applies to the residual and average-pooling z-rules; other rules divide exactly there.
    ``record``: if a dict, receives ``{op name: relevance at that op's input}`` for every op.
    """
    eps = getattr(rule, "eps", 0.0)
    for op, c in zip(reversed(ops), reversed(cache)):
        if isinstance(op, ResidualOp):
            ca, cb, ya, yb, y = c
            share = safe_div(R, y, eps)
            Ra = backprop(op.branch, ca, ya * share, rule, target, record)
            Rb = share.mul_(yb)
            R = Ra + (backprop(op.shortcut, cb, Rb, rule, target, record) if op.shortcut else Rb)
        elif isinstance(op, ConvOp):
            R = rule.input_conv(op, c, R) if op.first else rule.conv(op, c, R)
        elif isinstance(op, LinearOp):
            R = rule.head(op, c, R, target) if op.head else rule.linear(op, c, R)
        elif isinstance(op, PoolOp):
            R = _maxpool_route(op.module, c, R) if op.kind == "max" else _avgpool_z(op.module, c, R, eps)
        elif isinstance(op, FlattenOp):
            R = R.reshape(c)
        elif not isinstance(op, ReLUOp):
            raise TypeError(f"unknown op {op!r}")
        if record is not None:
            record[op.name] = R
    return R


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    """Target class per sample: arg-max of the logits when ``target`` is None, else as given."""
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, device=logits.device, dtype=torch.long)
    return t.expand(logits.shape[0]) if t.ndim == 0 else t


@torch.no_grad()
def propagate(
    model, x: torch.Tensor, rule, target=None, program: list | None = None, record: dict | None = None,
    chunk: int | None = None,
):
    """Relevance of every input element (B×C×H×W) for the target logit under ``rule``.

    LRP/RAP start from the one-hot target logit at the head. AE starts from the initial
    contribution map at the input of global average pooling: G = λ·f⊙mean_hw(∂y_t/∂f) with
    λ = 1/|ΣG| (eq. 5; one batched autograd call through the classification stage).
    ``chunk``: images per forward/backward sweep (every step is per sample: the result depends on it
    only through the convolution kernels' rounding); default :data:`CPU_CHUNK` on CPU — glibc serves
    blocks over 32 MB with fresh ``mmap`` pages, page-faulted at every allocation, which costs more
    than the arithmetic (3× on RAP); ResNet-50's largest intermediates at 224 px stay under it with
    4 images — and the whole batch elsewhere.
    Returns (relevance, logits B×K, target B).
    """
    ops = program if program is not None else build_program(model)
    n = max(1, chunk or (CPU_CHUNK if x.device.type == "cpu" else len(x)))
    t = None if target is None else torch.as_tensor(target, device=x.device, dtype=torch.long)
    parts, records = [], []
    for i in range(0, max(len(x), 1), n):  # an empty batch: one empty sweep
        rec = {} if record is not None else None
        parts.append(_sweep(ops, x[i : i + n], rule, t[i : i + n] if t is not None and t.ndim else t, rec))
        records.append(rec)
    if record is not None:
        record.update({k: torch.cat([r[k] for r in records]) for k in records[0]})
    rel, logits, target = (torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts))
    return rel.contiguous(), logits, target  # contiguous: a split forward runs channels-last on CPU


def _sweep(ops: list, x: torch.Tensor, rule, target, record: dict | None):
    """:func:`propagate` for one chunk of images."""
    if isinstance(rule, AttributionEquilibrium):
        k = gap_index(ops)
        f, cache = run(ops[:k], x)
        with torch.enable_grad():
            fr = f.detach().requires_grad_(True)
            logits, _ = run(ops[k:], fr)
            target = _targets(logits, target)
            (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), fr)
        G = f * g.mean((2, 3), keepdim=True)
        total = G.sum((1, 2, 3), keepdim=True).abs()
        R = safe_div(G, total)
        return backprop(ops[:k], cache, R, rule, target, record), logits.detach(), target
    logits, cache = run(ops, x, split=rule.split)
    target = _targets(logits, target)
    R = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    return backprop(ops, cache, R, rule, target, record), logits, target
