"""Training of the node classifier (:class:`~oodlib.longtail.network.GraphNet`): the
outlier-exposure loss, full-batch training and neighbour-sampled mini-batch training.

Loss: ``CE(z[train], y[train]) + λ · OE(z[oe])`` with ``OE(z) = mean_i (logsumexp(z_i) − mean_c z_ic)``
= cross-entropy to the uniform distribution (λ = 0.5). Score = MSP of softmax(z) (ID-confidence).

Full-batch training runs under :func:`~oodlib.memory.reuse_freed_memory`: with glibc, every freed
activation (50k×512 floats = 100 MB) is otherwise returned to the OS and page-faulted back on the
next allocation, which costs more than the arithmetic of an elementwise op.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from oodlib.longtail.network import GraphNet
from oodlib.memory import reuse_freed_memory


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe (paper: 200 epochs, Adam 1e-3, weight decay 1e-5, cosine, λ = 0.5).

    ``fanouts``/``batch_size`` switch on neighbour-sampled mini-batch training (``None`` = full batch).
    """

    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-5
    oe_weight: float = 0.5
    seed: int = 0
    fanouts: tuple[int, ...] | None = None
    batch_size: int | None = None


def oe_loss(logits: torch.Tensor) -> torch.Tensor:
    """Outlier-exposure loss: mean over rows of CE(uniform, softmax(z)) = logsumexp(z) − mean(z)."""
    if len(logits) == 0:
        return logits.sum()
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability per row (ID-confidence), N."""
    return torch.softmax(logits, dim=1).max(dim=1).values


def node_loss(logits: torch.Tensor, y: torch.Tensor, train: torch.Tensor, oe: torch.Tensor, oe_weight: float):
    """``CE(logits[train], y[train]) + λ·OE(logits[oe])``; returns (loss, ce, oe) tensors."""
    ce = F.cross_entropy(logits[train], y[train]) if bool(train.any()) else logits.sum() * 0
    o = oe_loss(logits[oe])
    return ce + oe_weight * o, ce, o


def _optimizer(net: GraphNet, tc: TrainConfig):
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, tc.epochs))


@torch.enable_grad()
def train_full_batch(
    net: GraphNet,
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    oe: torch.Tensor,
    adj: torch.Tensor | None,
    tc: TrainConfig,
) -> list[dict[str, float]]:
    """Full-batch training of ``net`` on all N nodes (all tensors on the same device).

    ``y`` (N,) int64 labels (ignored outside ``train``); ``train``/``oe`` (N,) bool masks; ``adj`` Â
    (required for a GCN). BatchNorm statistics are taken over every node of the graph (train, OE
    and validation nodes), as in the official code. Returns the per-epoch history: losses and the
    epoch's wall time in seconds.
    """
    torch.manual_seed(tc.seed)
    opt, sched = _optimizer(net, tc)
    net.train()
    history = []
    with reuse_freed_memory():
        ax = torch.sparse.mm(adj, x) if net.cfg.kind == "gcn" else None
        for _ in range(tc.epochs):
            start = time.perf_counter()
            logits, _ = net(x, adj, ax)
            loss, ce, o = node_loss(logits, y, train, oe, tc.oe_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append({"loss": loss.item(), "ce": ce.item(), "oe": o.item(),
                            "seconds": time.perf_counter() - start})
    net.eval()
    return history


def sample_subgraph(
    adj: torch.Tensor, seeds: torch.Tensor, fanouts: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour-sampled computation subgraph around ``seeds`` (NeighborLoader semantics).

    From each frontier node, up to ``fanouts[h]`` of its non-self neighbours are drawn without
    replacement at hop h. The returned adjacency keeps Â's self-loop values and rescales sampled
    entries by (row's neighbours / sampled count), an unbiased estimate of the full row's
    aggregation; nodes of the last hop keep only their self-loop.

    Args:
        adj: Â, sparse CSR N×N (CPU or GPU).
        seeds: node ids (S,), int64.
        fanouts: neighbours per node and hop, one entry per sampled hop.
    Returns:
        (nodes (M,) int64 with ``nodes[:S] == seeds``, sub-adjacency sparse CSR M×M).
    """
    crow, col, val = adj.crow_indices(), adj.col_indices(), adj.values()
    dev = crow.device
    nodes, frontier = seeds, seeds
    rows, cols, vals = [], [], []
    local = torch.full((adj.shape[0],), -1, dtype=torch.long, device=dev)
    local[seeds] = torch.arange(len(seeds), device=dev)
    for fan in fanouts:
        starts, lens = crow[frontier], crow[frontier + 1] - crow[frontier]
        owner = torch.repeat_interleave(torch.arange(len(frontier), device=dev), lens)
        offsets = torch.cumsum(lens, 0) - lens
        entry = starts[owner] + torch.arange(len(owner), device=dev) - offsets[owner]
        nbr = col[entry]
        keep = nbr != frontier[owner]
        owner, entry, nbr = owner[keep], entry[keep], nbr[keep]
        key = owner.double() + torch.rand(len(owner), generator=generator, device="cpu").to(dev, torch.float64)
        order = torch.argsort(key)
        owner, entry, nbr = owner[order], entry[order], nbr[order]
        n_nbr = torch.bincount(owner, minlength=len(frontier))
        rank = torch.arange(len(owner), device=dev) - (torch.cumsum(n_nbr, 0) - n_nbr)[owner]
        chosen = rank < fan
        owner, entry, nbr = owner[chosen], entry[chosen], nbr[chosen]
        n_chosen = torch.bincount(owner, minlength=len(frontier)).clamp(min=1)
        new = torch.unique(nbr[local[nbr] < 0])
        local[new] = torch.arange(len(nodes), len(nodes) + len(new), device=dev)
        nodes = torch.cat([nodes, new])
        rows.append(local[frontier[owner]])
        cols.append(local[nbr])
        vals.append(val[entry] * (n_nbr.to(val.dtype) / n_chosen.to(val.dtype))[owner])
        frontier = new
    self_val = _diagonal(adj)[nodes]
    m = len(nodes)
    ar = torch.arange(m, device=dev)
    rows, cols, vals = torch.cat(rows + [ar]), torch.cat(cols + [ar]), torch.cat(vals + [self_val])
    sub = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (m, m)).coalesce().to_sparse_csr()
    return nodes, sub


def _diagonal(adj: torch.Tensor) -> torch.Tensor:
    """Diagonal (N,) of a sparse CSR matrix."""
    crow, col, val = adj.crow_indices(), adj.col_indices(), adj.values()
    row = torch.repeat_interleave(torch.arange(adj.shape[0], device=crow.device), crow[1:] - crow[:-1])
    diag = torch.zeros(adj.shape[0], dtype=val.dtype, device=val.device)
    on = row == col
    diag[row[on]] = val[on]
    return diag


@torch.enable_grad()
def train_sampled(
    net: GraphNet,
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    oe: torch.Tensor,
    adj: torch.Tensor,
    tc: TrainConfig,
) -> list[dict[str, float]]:
    """Mini-batch GCN training on neighbour-sampled subgraphs (for graphs too large for full batch).

    Seeds are the train and OE nodes in a seeded random order, ``tc.batch_size`` per step; the
    first layer uses the exact cached ``Â x``, so ``len(tc.fanouts)`` should be ``num_layers − 1``.
    Loss on the seeds only. Returns the per-epoch mean loss history.
    """
    if net.cfg.kind != "gcn" or not tc.fanouts or not tc.batch_size:
        raise ValueError("sampled training needs kind='gcn', fanouts and batch_size")
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    ax = torch.sparse.mm(adj, x)
    candidates = torch.nonzero(train | oe).squeeze(1)
    opt, sched = _optimizer(net, tc)
    net.train()
    history = []
    for _ in range(tc.epochs):
        order = candidates[torch.randperm(len(candidates), generator=gen).to(candidates.device)]
        losses = []
        for i in range(0, len(order), tc.batch_size):
            seeds = order[i : i + tc.batch_size]
            nodes, sub = sample_subgraph(adj, seeds, tc.fanouts, gen)
            logits, _ = net(x[nodes], sub, ax[nodes], sub.t().to_sparse_csr())
            s = len(seeds)
            loss, _, _ = node_loss(logits[:s], y[seeds], train[seeds], oe[seeds], tc.oe_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
        sched.step()
        history.append({"loss": float(np.mean(losses))})
    net.eval()
    return history
