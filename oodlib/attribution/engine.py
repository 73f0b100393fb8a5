"""Batched relevance propagation: forward once, then walk the program backwards with one rule.

Layer-independent steps (shared by every rule):
* ReLU, Dropout, BatchNorm (inside :class:`~oodlib.attribution.graph.ConvOp` for RAP/AE): identity;
* max pooling: relevance routed to the arg-max input (equals the z-rule, which gives the winner
  x_max/z · R = R; it also keeps relevance sitting on zero activations, which AE's U term puts there);
* average pooling: z-rule R_i = x_i · Σ_j (∂z_j/∂x_i) R_j / z_j;
* residual add: z-rule, each branch gets its signed share a/(a+b) · R.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oodlib.attribution.graph import (
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
from oodlib.attribution.rules import AttributionEquilibrium, nan_to_zero_, safe_div


def _maxpool_route(module: torch.nn.MaxPool2d, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Route R (B×C×h×w) to the arg-max positions of ``x`` (overlapping windows accumulate)."""
    _, idx = F.max_pool2d(
        x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, return_indices=True
    )
    out = torch.zeros_like(x).flatten(2)
    out.scatter_add_(2, idx.flatten(2), R.flatten(2))
    return out.view_as(x)


def _avgpool_z(module: torch.nn.Module, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """z-rule through a (linear) average pooling, one batched vector-Jacobian product."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        z = module(xr)
        (g,) = torch.autograd.grad(z, xr, safe_div(R, z.detach()))
    return x * g


def backprop(ops: list, cache: list, R: torch.Tensor, rule, target: torch.Tensor, record: dict | None = None):
    """Propagate relevance ``R`` (at the output of ``ops``) to their input.

    ``record``: if a dict, receives ``{op name: relevance at that op's input}`` for every op.
    """
    for op, c in zip(reversed(ops), reversed(cache)):
        if isinstance(op, ResidualOp):
            ca, cb, ya, yb, y = c
            share = nan_to_zero_(torch.div(R, y))  # safe R / y
            Ra = backprop(op.branch, ca, ya * share, rule, target, record)
            Rb = share.mul_(yb)
            R = Ra + (backprop(op.shortcut, cb, Rb, rule, target, record) if op.shortcut else Rb)
        elif isinstance(op, ConvOp):
            R = rule.input_conv(op, c, R) if op.first else rule.conv(op, c, R)
        elif isinstance(op, LinearOp):
            R = rule.head(op, c, R, target) if op.head else rule.linear(op, c, R)
        elif isinstance(op, PoolOp):
            R = _maxpool_route(op.module, c, R) if op.kind == "max" else _avgpool_z(op.module, c, R)
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
def propagate(model, x: torch.Tensor, rule, target=None, program: list | None = None, record: dict | None = None):
    """Relevance of every input element (B×C×H×W) for the target logit under ``rule``.

    LRP/RAP start from the one-hot target logit at the head. AE starts from the initial
    contribution map at the input of global average pooling: G = λ·f⊙mean_hw(∂y_t/∂f) with
    λ = 1/|ΣG| (eq. 5; one batched autograd call through the classification stage).
    Returns (relevance, logits B×K, target B).
    """
    ops = program if program is not None else build_program(model)
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
