"""Long-tailed OOD detection with graph embeddings — the estimator (:class:`GraphOOD`).

``GraphOOD(kind="gcn").fit(features, labels, role)`` builds the cosine kNN training graph over the
train-ID ∪ OE ∪ val nodes (``role`` per node), trains the node classifier with CE + λ·OE, and
``predict(features)`` builds an *inductive* graph over the given test nodes only (test-ID ∪ one
test-OOD set, or one random batch at a time with ``batch_size``) and returns per node the
ID-confidence ``score`` (MSP of the GCN output), ``pred``, ``logits`` and ``embedding``.

Ablations/baselines (paper Table 4, Tab. 10–11) are the same estimator on different node features:
:data:`ABLATIONS` maps a score name to (features-table column, kind).
"""
from __future__ import annotations

import numpy as np
import torch

from oodlib.device import resolve_device
from oodlib.estimator import Estimator
from oodlib.longtail.knn_graph import (
    cosine_knn,
    knn_edge_index,
    normalized_adjacency,
    random_batches,
)
from oodlib.longtail.network import KINDS, GraphNet, GraphNetConfig
from oodlib.longtail.training import TrainConfig, msp, train_full_batch, train_sampled

ROLES = ("train", "oe", "val")

#: score name → (features-table column holding the node features, classifier kind).
#: ``gcn`` is the paper's method (Pre-train+Gau.+GCN); ``gfeatures`` are the Gaussianized features.
ABLATIONS: dict[str, tuple[str, str]] = {
    "pretrain": ("features", "linear"),
    "pretrain_gau": ("gfeatures", "linear"),
    "pretrain_gcn": ("features", "gcn"),
    "gcn": ("gfeatures", "gcn"),
    "pretrain_gau_mlp": ("gfeatures", "mlp"),
}


class GraphOOD(Estimator):
    """Graph-based long-tailed OOD detector (ID-confidence: higher = more in-distribution).

    Args:
        kind: ``"gcn"`` (paper), ``"mlp"`` (same parameter count, no graph) or ``"linear"``.
        k: kNN graph neighbours including the self-loop. ``index``/``nprobe``: faiss search (see
            :func:`oodlib.longtail.knn_graph.cosine_knn`).
        hidden, num_layers, dropout, logit_bn: network shape (paper: 512 — 2048 for ResNet-50
            features —, 3, 0.6, True).
        epochs, lr, weight_decay, oe_weight, seed: training recipe (200, 1e-3, 1e-5, 0.5, 0).
        fanouts, batch_size: neighbour-sampled mini-batch training (``None`` = full batch).
        num_classes: ID classes (default: max train label + 1).
        device: ``"auto"`` = CUDA when present, else a torch device string (``"cpu"``, ``"cuda:1"``).

    Fitted attributes (after :meth:`fit` or :meth:`load`): ``weights_`` (the network's state dict
    as NumPy arrays), ``in_dim_``, ``num_classes_``, ``edge_index_`` (2×E int64, the training graph)
    and ``history_`` (per-epoch training losses: ``{"loss": (epochs,), …}``; not the epoch times,
    so fitting the same data twice gives the same bytes).
    """

    name = "graph_ood"

    def __init__(
        self,
        kind: str = "gcn",
        k: int = 7,
        hidden: int = 512,
        num_layers: int = 3,
        dropout: float = 0.6,
        logit_bn: bool = True,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        oe_weight: float = 0.5,
        seed: int = 0,
        fanouts: tuple[int, ...] | list[int] | None = None,
        batch_size: int | None = None,
        index: str = "flat",
        nprobe: int = 16,
        num_classes: int | None = None,
        device: str = "auto",
    ) -> None:
        self.kind, self.k, self.hidden, self.num_layers = kind, k, hidden, num_layers
        self.dropout, self.logit_bn = dropout, logit_bn
        self.epochs, self.lr, self.weight_decay, self.oe_weight, self.seed = epochs, lr, weight_decay, oe_weight, seed
        self.fanouts = tuple(fanouts) if fanouts else None
        self.batch_size = batch_size
        self.index, self.nprobe, self.num_classes = index, nprobe, num_classes
        self.device = str(device)

    @classmethod
    def contract_variants(cls) -> list[dict]:
        """One small, fast setting per classifier kind (for the estimator contract tests)."""
        return [{"kind": kind, "epochs": 3, "hidden": 16} for kind in KINDS]

    def _train_config(self) -> TrainConfig:
        return TrainConfig(self.epochs, self.lr, self.weight_decay, self.oe_weight, self.seed,
                           self.fanouts, self.batch_size)

    def _net_config(self) -> GraphNetConfig:
        return GraphNetConfig(self.in_dim_, self.num_classes_, self.kind, self.hidden, self.num_layers,
                              self.dropout, self.logit_bn)

    def _graph(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edge_index 2×E, Â sparse CSR on the device) over the rows of ``x``; (empty, None) without a graph."""
        if self.kind != "gcn":
            return torch.empty(2, 0, dtype=torch.long), None
        nbrs = cosine_knn(x, min(self.k, len(x)), index=self.index, nprobe=self.nprobe, device=self._device)[1]
        edge_index = knn_edge_index(nbrs)
        return edge_index, normalized_adjacency(edge_index, len(x)).to(self._device)

    def fit(self, features: np.ndarray, labels: np.ndarray, role: np.ndarray) -> GraphOOD:
        """Train on the training graph.

        Args:
            features: node features N×D (train-ID, OE and val nodes, any order).
            labels: (N,) int class of ID nodes; ignored for OE nodes (use −1).
            role: (N,) str, each ``"train"`` (CE loss), ``"oe"`` (OE loss) or ``"val"`` (graph only).
        Returns:
            self, with the fitted attributes set (see the class docstring).
        """
        x = np.asarray(features, np.float32)
        role = np.asarray(role).astype(str)
        labels = np.asarray(labels, np.int64)
        if not np.isin(role, ROLES).all():
            raise ValueError(f"role must be one of {ROLES}")
        train, oe = role == "train", role == "oe"
        if not train.any():
            raise ValueError("no training (role='train') nodes")
        c = self.num_classes or int(labels[train].max()) + 1
        if labels[train].min() < 0 or labels[train].max() >= c:
            raise ValueError(f"training labels must lie in [0, {c})")
        for attr in list(self.fitted_attributes()):
            delattr(self, attr)
        self._device = dev = resolve_device(self.device)
        edge_index, adj = self._graph(x)
        tc = self._train_config()
        torch.manual_seed(tc.seed)
        net = GraphNet(GraphNetConfig(x.shape[1], c, self.kind, self.hidden, self.num_layers, self.dropout,
                                      self.logit_bn)).to(dev)
        args = (net, torch.from_numpy(x).to(dev), torch.from_numpy(np.where(train, labels, 0)).to(dev),
                torch.from_numpy(train).to(dev), torch.from_numpy(oe).to(dev), adj, tc)
        history = train_sampled(*args) if tc.fanouts else train_full_batch(*args)
        self.weights_ = {k: v.detach().cpu().clone().numpy() for k, v in net.state_dict().items()}
        self.in_dim_, self.num_classes_ = int(x.shape[1]), int(c)
        self.edge_index_ = edge_index.cpu().numpy()
        # the losses are fitted state; the epoch wall times are not (same data, same bytes)
        keys = [k for k in (history[0] if history else ("loss",)) if k != "seconds"]
        self.history_ = {key: np.array([h[key] for h in history], np.float64) for key in keys}
        self._restore()
        return self

    def _restore(self) -> None:
        """The torch network (eval mode, on the resolved device) from ``weights_``."""
        self._device = resolve_device(self.device)
        with torch.random.fork_rng(devices=[]):  # the initialization is overwritten: leave the global RNG alone
            net = GraphNet(self._net_config())
        net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in self.weights_.items()})
        self._net = net.to(self._device).eval()

    @torch.no_grad()
    def _predict_graph(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        """Outputs for one inductive graph over the rows of ``x``."""
        _, adj = self._graph(x)
        logits, emb = self._net(torch.from_numpy(x).to(self._device), adj)
        return {"score": msp(logits), "pred": logits.argmax(1), "logits": logits, "embedding": emb}

    def predict(
        self, features: np.ndarray, batch_size: int | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Inductive inference on test nodes (e.g. test-ID ∪ one test-OOD set).

        Args:
            features: N×D test node features; the kNN graph is built over these rows only.
            batch_size: build a separate graph per seeded random batch of this size (paper B.3);
                ``None`` = one graph over all rows.
        Returns:
            ``score`` (N,) float32 MSP (ID-confidence), ``pred`` (N,) int32, ``logits`` (N×C) and
            ``embedding`` (N×hidden) float32, in the input row order.
        Raises:
            NotFittedError: before :meth:`fit` / :meth:`load`.
        """
        self.check_fitted()
        x = np.asarray(features, np.float32)
        n = len(x)
        parts = [np.arange(n)] if batch_size is None else random_batches(n, batch_size, seed)
        out: dict[str, np.ndarray] = {}
        for idx in parts:
            res = self._predict_graph(x[idx])
            for key, val in res.items():
                if key not in out:
                    out[key] = np.empty((n, *val.shape[1:]), np.int32 if key == "pred" else np.float32)
                out[key][idx] = val.cpu().numpy()
        return out


def make_ablation(name: str, **overrides) -> tuple[str, GraphOOD]:
    """(features column, unfitted estimator) of ablation ``name`` from :data:`ABLATIONS`."""
    if name not in ABLATIONS:
        raise KeyError(f"unknown ablation {name!r}; known: {sorted(ABLATIONS)}")
    column, kind = ABLATIONS[name]
    return column, GraphOOD(kind=kind, **overrides)
