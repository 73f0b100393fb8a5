"""Long-tailed OOD detection with graph embeddings (paper: graph_longtail_ood; spec: graph_ltood.md).

Pipeline: :func:`gaussianize` the backbone (BN statistics on the LT ID train data) → node features
→ :func:`cosine_knn_graph` (faiss, k = 7 incl. self) → :class:`GraphOOD` (3-layer GCN, CE + 0.5·OE)
→ MSP score per node (ID-confidence) and the last hidden layer as the node embedding.

Modules: :mod:`~oodlib.longtail.gaussianize`, :mod:`~oodlib.longtail.knn_graph`,
:mod:`~oodlib.longtail.network` (the GCN / MLP / linear node classifier),
:mod:`~oodlib.longtail.training` (losses, full-batch and neighbour-sampled training),
:mod:`~oodlib.longtail.detector` (the :class:`GraphOOD` estimator and the ablations),
:mod:`~oodlib.longtail.neighbours` (neighbour statistics of the kNN graph).
"""
from oodlib.longtail.detector import ABLATIONS, GraphOOD, make_ablation
from oodlib.longtail.gaussianize import (
    bn_state,
    finetune_bn,
    gaussianize,
    load_bn_state,
    paired_features,
    recalibrate_bn,
    save_bn_state,
)
from oodlib.longtail.knn_graph import (
    cosine_knn,
    cosine_knn_graph,
    knn_edge_index,
    neighbour_recall,
    normalized_adjacency,
    random_batches,
)
from oodlib.longtail.neighbours import neighbour_stats, neighbour_stats_by_class
from oodlib.longtail.network import GraphNet, GraphNetConfig
from oodlib.longtail.training import TrainConfig, oe_loss

__all__ = [
    "ABLATIONS", "GraphNet", "GraphNetConfig", "GraphOOD", "TrainConfig", "bn_state", "cosine_knn",
    "cosine_knn_graph", "finetune_bn", "gaussianize", "knn_edge_index",
    "load_bn_state", "make_ablation", "neighbour_recall", "neighbour_stats",
    "neighbour_stats_by_class", "normalized_adjacency", "oe_loss", "paired_features", "random_batches",
    "recalibrate_bn", "save_bn_state",
]
