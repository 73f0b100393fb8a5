"""Long-tailed OOD detection with graph embeddings (paper: graph_longtail_ood; spec: graph_ltood.md).

Pipeline: :func:`gaussianize` the backbone (BN statistics on the LT ID train data) → node features
→ :func:`cosine_knn_graph` (faiss, k = 7 incl. self) → :class:`GraphOOD` (3-layer GCN, CE + 0.5·OE)
→ MSP score per node (ID-confidence) and the last hidden layer as the node embedding.
"""
from oodlib.graph.evaluate import neighbour_stats, neighbour_stats_by_class
from oodlib.graph.gaussianize import (
    bn_state,
    finetune_bn,
    gaussianize,
    load_bn_state,
    paired_features,
    recalibrate_bn,
    save_bn_state,
)
from oodlib.graph.gcn import (
    GraphNet,
    GraphNetConfig,
    TrainConfig,
    load_graph_net,
    oe_loss,
    save_graph_net,
)
from oodlib.graph.knn_graph import (
    cosine_knn,
    cosine_knn_graph,
    knn_edge_index,
    neighbour_recall,
    normalized_adjacency,
    random_batches,
)
from oodlib.graph.ltood import ABLATIONS, GraphOOD, make_ablation

__all__ = [
    "ABLATIONS", "GraphNet", "GraphNetConfig", "GraphOOD", "TrainConfig", "bn_state", "cosine_knn",
    "cosine_knn_graph", "finetune_bn", "gaussianize", "knn_edge_index",
    "load_bn_state", "load_graph_net", "make_ablation", "neighbour_recall", "neighbour_stats",
    "neighbour_stats_by_class", "normalized_adjacency", "oe_loss", "paired_features", "random_batches",
    "recalibrate_bn", "save_bn_state", "save_graph_net",
]
