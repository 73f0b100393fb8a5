"""The node classifier of the graph method: a 3-layer GCN (torch-geometric ``GCNConv``), its
same-size MLP, and a linear probe; the outlier-exposure loss; full-batch and neighbour-sampled
training.

Architecture (paper / official code ``GCN1``), for ``num_layers = 3``::

    h1 = Dropout(ReLU(BN(GCNConv(x,  Â))))      # D → hidden
    h2 = Dropout(ReLU(BN(GCNConv(h1, Â))))      # hidden → hidden   (= the node *embedding*)
    z  = BN(GCNConv(h2, Â))                      # hidden → C        (logit BN: official code)

``GCNConv(h, Â) = Â (h W) + b`` with the cached normalized adjacency Â (sparse CSR). The GCN layers
keep torch-geometric's ``GCNConv`` parameters (``lin.weight``, ``bias``) but are evaluated by
:func:`aggregate`, whose backward uses Âᵀ = Â directly (no sparse transpose per step). Because the
input features never change and are not dropped out (dropout follows ReLU), the first layer is
``(Â x) W + b`` with ``Â x`` computed once for all epochs. The MLP (``kind="mlp"``) is the same
network with ``nn.Linear`` layers and no aggregation — exactly the GCN's parameter count;
``kind="linear"`` is a single ``nn.Linear`` D → C (the "Pre-train" / "Pre-train+Gau." baselines).

ReLU + dropout is one autograd function (:func:`relu_dropout`) whose mask comes from
``torch.rand`` (``bernoulli_`` is ~4× slower on the CPU) and whose backward is a single product.
Full-batch training runs under :func:`reuse_freed_memory`: with glibc, every freed activation
(50k×512 floats = 100 MB) is otherwise returned to the OS and page-faulted back on the next
allocation, which costs more than the arithmetic of an elementwise op.

Loss: ``CE(z[train], y[train]) + λ · OE(z[oe])`` with ``OE(z) = mean_i (logsumexp(z_i) − mean_c z_ic)``
= cross-entropy to the uniform distribution (λ = 0.5). Score = MSP of softmax(z) (ID-confidence).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import GCNConv

KINDS = ("gcn", "mlp", "linear")


@dataclass(frozen=True)
class GraphNetConfig:
    """Shape of the node classifier (recorded with the fitted weights)."""

    in_dim: int
    num_classes: int
    kind: str = "gcn"
    hidden: int = 512
    num_layers: int = 3
    dropout: float = 0.6
    logit_bn: bool = True


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


class GraphNet(nn.Module):
    """GCN / MLP / linear node classifier; ``forward`` returns (logits N×C, embedding N×hidden)."""

    def __init__(self, cfg: GraphNetConfig) -> None:
        super().__init__()
        if cfg.kind not in KINDS:
            raise ValueError(f"unknown kind {cfg.kind!r}; known: {KINDS}")
        self.cfg = cfg
        if cfg.kind == "linear":
            dims = [cfg.in_dim, cfg.num_classes]
        else:
            dims = [cfg.in_dim] + [cfg.hidden] * (cfg.num_layers - 1) + [cfg.num_classes]
        make = (lambda i, o: GCNConv(i, o, normalize=False)) if cfg.kind == "gcn" else nn.Linear
        self.layers = nn.ModuleList(make(i, o) for i, o in itertools.pairwise(dims))
        n_bn = len(self.layers) - 1 + int(cfg.logit_bn and cfg.kind != "linear")
        self.bns = nn.ModuleList(nn.BatchNorm1d(d) for d in dims[1 : 1 + n_bn])

    def forward(
        self,
        x: torch.Tensor,
        adj: torch.Tensor | None = None,
        ax: torch.Tensor | None = None,
        adj_t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embedding of N nodes.

        Args:
            x: node features N×D.
            adj: normalized adjacency Â (sparse CSR N×N); required for ``kind="gcn"``.
            ax: optional cached ``Â x`` (N×D) for the first GCN layer.
            adj_t: Âᵀ (sparse CSR) for the backward pass; ``None`` = Â is symmetric (every graph
                from :func:`~oodlib.graph.knn_graph.normalized_adjacency`).
        Returns:
            (logits N×C, embedding = last hidden layer after ReLU/dropout, N×hidden; for
            ``kind="linear"`` the input features).
        """
        h, emb = x, x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.cfg.kind != "gcn":
                h = layer(h)
            elif i == 0:
                ax = torch.sparse.mm(adj, x) if ax is None else ax
                h = torch.addmm(layer.bias, ax, layer.lin.weight.T)
            else:
                h = aggregate(adj, h @ layer.lin.weight.T, layer.bias, adj_t)
            if i < last:
                h = relu_dropout(self.bns[i](h), self.cfg.dropout, self.training)
                emb = h
            elif i < len(self.bns):
                h = self.bns[i](h)
        return h, emb


class _Aggregate(torch.autograd.Function):
    """``Â h + b`` with a given Âᵀ for the backward pass (no gradient for Â)."""

    @staticmethod
    def forward(ctx, adj, adj_t, h, bias):
        ctx.adj_t = adj_t
        return torch.sparse.mm(adj, h).add_(bias)

    @staticmethod
    def backward(ctx, grad):
        return None, None, torch.sparse.mm(ctx.adj_t, grad), grad.sum(0)


def aggregate(adj: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, adj_t: torch.Tensor | None = None) -> torch.Tensor:
    """GCN aggregation ``Â h + b`` (N×F) of sparse CSR Â (N×M), h (M×F), bias (F,); ``adj_t`` = Âᵀ
    for the backward pass, ``None`` when Â is symmetric."""
    return _Aggregate.apply(adj, adj if adj_t is None else adj_t, h, bias)


class _ReluDropout(torch.autograd.Function):
    """``relu(h) · m`` with m = 1/(1−p) on kept entries (probability 1 − p) and 0 elsewhere."""

    @staticmethod
    def forward(ctx, h, p):
        keep = 1.0 - p
        u = torch.rand_like(h).masked_fill_(h <= 0, 1.0)  # ReLU's zeros: u = 1 is never kept
        m = u.lt_(keep).mul_(1.0 / keep)
        ctx.save_for_backward(m)
        return h * m

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        return grad * m, None


def relu_dropout(h: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(F.relu(h), p, training)`` (same distribution, other random stream), fused."""
    if not training or p == 0:
        return F.relu(h)
    return _ReluDropout.apply(h, p)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextmanager
def reuse_freed_memory():
    """Within the block, glibc keeps freed large blocks for reuse (no mmap, no trimming); on exit
    the default values are set again (glibc's dynamic mmap threshold stays off, as after any
    ``mallopt``) and the kept memory is returned to the OS. No-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        libc, ok = None, False
    try:
        yield
    finally:
        if ok:
            for param, value in _GLIBC_DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)


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


def save_graph_net(net: GraphNet, path: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors; the config (and ``extra``, JSON-serializable) in the metadata."""
    meta = {"config": json.dumps(asdict(net.cfg)), "extra": json.dumps(extra or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_graph_net(path: str | Path) -> tuple[GraphNet, dict]:
    """(net in eval mode, extra metadata) from :func:`save_graph_net`'s file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    net = GraphNet(GraphNetConfig(**json.loads(meta["config"])))
    net.load_state_dict(load_file(str(path)))
    return net.eval(), json.loads(meta["extra"])
