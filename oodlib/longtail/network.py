"""The node classifier of the graph method: a 3-layer GCN (torch-geometric ``GCNConv``), its
same-size MLP, and a linear probe.

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
Training: :mod:`oodlib.longtail.training`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import GCNConv

KINDS = ("gcn", "mlp", "linear")


@dataclass(frozen=True)
class GraphNetConfig:
    """Shape of the node classifier."""

    in_dim: int
    num_classes: int
    kind: str = "gcn"
    hidden: int = 512
    num_layers: int = 3
    dropout: float = 0.6
    logit_bn: bool = True


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
                from :func:`~oodlib.longtail.knn_graph.normalized_adjacency`).
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
