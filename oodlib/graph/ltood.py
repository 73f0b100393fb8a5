"""Long-tailed OOD detection with graph embeddings — the scikit-learn-like estimator.

``GraphOOD(kind="gcn").fit(features, labels, role)`` builds the cosine kNN training graph over the
train-ID ∪ OE ∪ val nodes (``role`` per node), trains the node classifier with CE + λ·OE, and
``predict(features)`` builds an *inductive* graph over the given test nodes only (test-ID ∪ one
test-OOD set, or one random batch at a time with ``batch_size``) and returns per node the
ID-confidence ``score`` (MSP of the GCN output), ``pred``, ``logits`` and ``embedding``.

Ablations/baselines (paper Table 4, Tab. 10–11) are the same estimator on different node features:
:data:`ABLATIONS` maps a score name to (features-table column, kind).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from oodlib.device import resolve_device
from oodlib.graph.gcn import (
    GraphNet,
    GraphNetConfig,
    TrainConfig,
    load_graph_net,
    msp,
    save_graph_net,
    train_full_batch,
    train_sampled,
)
from oodlib.graph.knn_graph import (
    cosine_knn,
    knn_edge_index,
    normalized_adjacency,
    random_batches,
)

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


class GraphOOD:
    """Graph-based long-tailed OOD detector (ID-confidence: higher = more in-distribution).

    Args:
        kind: ``"gcn"`` (paper), ``"mlp"`` (same parameter count, no graph) or ``"linear"``.
        k: kNN graph neighbours including the self-loop. ``index``/``nprobe``: faiss search (see
            :func:`oodlib.graph.knn_graph.cosine_knn`).
        hidden, num_layers, dropout, logit_bn: network shape (paper: 512 — 2048 for ResNet-50
            features —, 3, 0.6, True).
        epochs, lr, weight_decay, oe_weight, seed: training recipe (200, 1e-3, 1e-5, 0.5, 0).
        fanouts, batch_size: neighbour-sampled mini-batch training (``None`` = full batch).
        num_classes: ID classes (default: max train label + 1).
        device: ``"auto"`` = CUDA when present.
    """

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
        fanouts: tuple[int, ...] | None = None,
        batch_size: int | None = None,
        index: str = "flat",
        nprobe: int = 16,
        num_classes: int | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        self.kind, self.k, self.hidden, self.num_layers = kind, k, hidden, num_layers
        self.dropout, self.logit_bn, self.num_classes = dropout, logit_bn, num_classes
        self.train_cfg = TrainConfig(epochs, lr, weight_decay, oe_weight, seed,
                                     tuple(fanouts) if fanouts else None, batch_size)
        self.index, self.nprobe = index, nprobe
        self.device = resolve_device(device)
        self.net_: GraphNet | None = None

    def params(self) -> dict[str, float | int | str | bool]:
        """Hyperparameters and seed (logged with the run)."""
        tc = asdict(self.train_cfg)
        tc["fanouts"] = ",".join(map(str, tc["fanouts"])) if tc["fanouts"] else ""
        tc["batch_size"] = tc["batch_size"] or 0
        return {"kind": self.kind, "k": self.k, "hidden": self.hidden, "num_layers": self.num_layers,
                "dropout": self.dropout, "logit_bn": self.logit_bn, "index": self.index, **tc}

    def _graph(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edge_index 2×E, Â sparse CSR on the device) over the rows of ``x``; (empty, None) without a graph."""
        if self.kind != "gcn":
            return torch.empty(2, 0, dtype=torch.long), None
        nbrs = cosine_knn(x, min(self.k, len(x)), index=self.index, nprobe=self.nprobe, device=self.device)[1]
        edge_index = knn_edge_index(nbrs)
        return edge_index, normalized_adjacency(edge_index, len(x)).to(self.device)

    def fit(self, features: np.ndarray, labels: np.ndarray, role: np.ndarray) -> GraphOOD:
        """Train on the training graph.

        Args:
            features: node features N×D (train-ID, OE and val nodes, any order).
            labels: (N,) int class of ID nodes; ignored for OE nodes (use −1).
            role: (N,) str, each ``"train"`` (CE loss), ``"oe"`` (OE loss) or ``"val"`` (graph only).
        Sets ``edge_index_`` (training graph), ``history_`` (per-epoch losses), ``net_``.
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
        self.edge_index_, adj = self._graph(x)
        torch.manual_seed(self.train_cfg.seed)
        cfg = GraphNetConfig(x.shape[1], c, self.kind, self.hidden, self.num_layers, self.dropout, self.logit_bn)
        self.net_ = GraphNet(cfg).to(self.device)
        dev = self.device
        args = (self.net_, torch.from_numpy(x).to(dev), torch.from_numpy(np.where(train, labels, 0)).to(dev),
                torch.from_numpy(train).to(dev), torch.from_numpy(oe).to(dev), adj, self.train_cfg)
        self.history_ = train_sampled(*args) if self.train_cfg.fanouts else train_full_batch(*args)
        return self

    @torch.no_grad()
    def _predict_graph(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for one inductive graph over the rows of ``x``."""
        _, adj = self._graph(x)
        logits, emb = self.net_.eval()(torch.from_numpy(x).to(self.device), adj)
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
        """
        if self.net_ is None:
            raise RuntimeError("GraphOOD is not fitted")
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

    def save(self, path: str | Path) -> None:
        """Fitted network as safetensors (config + estimator params in the metadata)."""
        if self.net_ is None:
            raise RuntimeError("GraphOOD is not fitted")
        save_graph_net(self.net_, path, extra=self.params())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> GraphOOD:
        """A fitted estimator from :meth:`save`'s file."""
        net, p = load_graph_net(path)
        fanouts = tuple(int(f) for f in p["fanouts"].split(",")) if p["fanouts"] else None
        est = cls(p["kind"], p["k"], p["hidden"], p["num_layers"], p["dropout"], p["logit_bn"], p["epochs"],
                  p["lr"], p["weight_decay"], p["oe_weight"], p["seed"], fanouts, p["batch_size"] or None,
                  p["index"], num_classes=net.cfg.num_classes, device=device)
        est.net_ = net.to(est.device)
        return est


def make_ablation(name: str, **overrides) -> tuple[str, GraphOOD]:
    """(features column, unfitted estimator) of ablation ``name`` from :data:`ABLATIONS`."""
    if name not in ABLATIONS:
        raise KeyError(f"unknown ablation {name!r}; known: {sorted(ABLATIONS)}")
    column, kind = ABLATIONS[name]
    return column, GraphOOD(kind=kind, **overrides)
