"""Cosine k-nearest-neighbour graphs over node features (faiss) and the GCN adjacency.

Conventions:

* Node features ``x`` are N×D float; similarity is cosine, computed as the inner product of
  L2-normalized rows (all-zero rows stay zero and have similarity 0 to everything).
* ``k`` counts the node itself (paper: k = 7 *including* the self-loop). A row whose search did not
  return the node itself (duplicates) gets the self index in its last slot, so every node has a
  self-loop and at most k − 1 other out-neighbours.
* The graph is made undirected: edge (i, j) exists when j is among i's k nearest or i among j's.
  ``edge_index`` is a torch ``int64`` tensor 2×E, sorted by (row, col), without duplicates.
* The normalized adjacency is ``Â = D^{-1/2} A D^{-1/2}`` (Kipf & Welling), A the binary
  symmetric adjacency with self-loops, D its degree; returned as a torch sparse CSR matrix and
  cached by the caller (it is the same for every epoch).

Exact search (``index="flat"``) on the CPU is :func:`oodlib.faiss_index.exact_self_knn` (torch GEMM
over the upper triangle of the Gram matrix + faiss heap selection); on a CUDA device with faiss-gpu,
a faiss ``IndexFlatIP`` search on the GPU. ``"ivf"`` (IVF-Flat) and ``"hnsw"`` are
approximate indexes for very large node sets (> 1M); measure their recall against exact search on
a sample with :func:`neighbour_recall`.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from oodlib.faiss_index import (
    exact_self_knn,
    faiss_gpu,
    inner_product_index,
    l2_normalize,
)


def cosine_knn(
    x: np.ndarray | torch.Tensor,
    k: int = 7,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    device: str | torch.device = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest nodes of every node by cosine similarity, the node itself included.

    Args:
        x: node features N×D.
        k: neighbours per node, self included (k ≤ N).
        index: ``"flat"`` (exact), ``"ivf"``, ``"hnsw"`` (approximate) or ``"auto"`` (exact up to
            1M nodes, IVF above). ``nlist``/``nprobe``: IVF cells (default ≈ 4·√N) and cells probed;
            ``hnsw_m``/``ef_search``: HNSW graph degree and search breadth.
        device: ``"auto"`` uses faiss-gpu when a GPU and faiss-gpu are present.

    Returns:
        (sims N×k float32 in descending order, idx N×k int64); approximate indexes may miss
        neighbours (their slots are filled with the node itself).
    """
    xn = l2_normalize(x)
    n = len(xn)
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, N={n}], got {k}")
    if index == "flat" and not faiss_gpu(device):
        sims, nbrs = exact_self_knn(xn, k)
    else:
        idx = inner_product_index(xn, index, nlist, nprobe, hnsw_m, ef_search, device=device)
        sims, nbrs = idx.search(xn, k)
    rows = np.arange(n)
    nbrs = np.where(nbrs < 0, rows[:, None], nbrs).astype(np.int64)
    missing_self = ~(nbrs == rows[:, None]).any(axis=1)
    nbrs[missing_self, -1] = rows[missing_self]
    sims[missing_self, -1] = (xn[missing_self] ** 2).sum(axis=1)
    return sims.astype(np.float32), nbrs


def knn_edge_index(nbrs: np.ndarray) -> torch.Tensor:
    """Undirected edge index (2×E int64, sorted by (row, col), unique) from neighbour lists N×k."""
    n, k = nbrs.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = nbrs.reshape(-1).astype(np.int64)
    keys = np.unique(np.concatenate([rows * n + cols, cols * n + rows]))
    return torch.from_numpy(np.stack([keys // n, keys % n]))


def cosine_knn_graph(x: np.ndarray | torch.Tensor, k: int = 7, **search) -> torch.Tensor:
    """Undirected cosine kNN graph (self-loops included) over the rows of ``x``: edge index 2×E.

    ``search`` is passed to :func:`cosine_knn` (``index``, ``nprobe``, ``device`` …).
    """
    return knn_edge_index(cosine_knn(x, k, **search)[1])


def normalized_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``Â = D^{-1/2} (A + I_missing) D^{-1/2}`` as a float32 sparse CSR matrix N×N.

    ``edge_index`` (2×E) must be symmetric; self-loops are added where missing (as torch-geometric's
    ``GCNConv`` does), so Â equals GCNConv's normalization of the same graph.
    """
    n = num_nodes
    keys = edge_index[0].cpu().numpy().astype(np.int64) * n + edge_index[1].cpu().numpy().astype(np.int64)
    keys = np.unique(np.concatenate([keys, np.arange(n, dtype=np.int64) * (n + 1)]))
    rows, cols = keys // n, keys % n
    counts = np.bincount(rows, minlength=n)
    inv_sqrt = 1.0 / np.sqrt(counts.astype(np.float64))
    vals = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    crow = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(vals), (n, n)
        )


def neighbour_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (N×k) found in its approximate row (N×k')."""
    hits = (approx[:, :, None] == exact[:, None, :]).any(axis=1)
    return float(hits.mean())


def random_batches(num_nodes: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded random partition of ``range(num_nodes)`` into batches of ``batch_size`` (last smaller)."""
    order = np.random.default_rng(seed).permutation(num_nodes)
    return [order[i : i + batch_size] for i in range(0, num_nodes, batch_size)]
