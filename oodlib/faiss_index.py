"""Inner-product faiss indexes over L2-normalized rows (cosine similarity), shared by the KNN
detector and the kNN graph.

``kind``: ``"flat"`` (exact: BLAS GEMM + heap selection), ``"ivf"`` (IVF-Flat, nlist ≈ 4·√N,
trained on ≤ 256·nlist seeded rows, ``nprobe`` cells searched), ``"hnsw"`` (HNSW, degree
``hnsw_m``, search breadth ``ef_search``; CPU only), or ``"auto"`` = exact up to
:data:`EXACT_MAX_ROWS` rows, IVF above. On a CUDA device with faiss-gpu installed, flat and IVF
indexes move to the GPU.

:func:`exact_self_knn` is the exact all-rows-against-all-rows search of a kNN graph on the CPU: the
same BLAS + heap work as ``IndexFlatIP.search(xn, k)``, halved by the symmetry of the Gram matrix.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from oodlib.device import resolve_device

KINDS = ("auto", "flat", "ivf", "hnsw")
#: Rows above which ``kind="auto"`` switches from exact to IVF search.
EXACT_MAX_ROWS = 1_000_000


def l2_normalize(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows of ``x`` (N×D) scaled to unit L2 norm, float32 C-contiguous (zero rows stay zero)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def faiss_gpu(device: str | torch.device = "auto") -> bool:
    """Whether faiss indexes run on ``device``'s GPU (a CUDA device and faiss-gpu installed)."""
    return resolve_device(device).type == "cuda" and hasattr(faiss, "StandardGpuResources")


def inner_product_index(
    xn: np.ndarray, kind: str = "auto", nlist: int | None = None, nprobe: int = 32, hnsw_m: int = 32,
    ef_search: int = 128, seed: int = 0, device: str | torch.device = "auto",
) -> faiss.Index:
    """A filled faiss inner-product index over the normalized rows ``xn`` (N×D float32)."""
    n, d = xn.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX_ROWS else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 256 * nlist), replace=False))
        index.train(xn[rows])
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}; known: {KINDS}")
    dev = resolve_device(device)
    if kind != "hnsw" and faiss_gpu(dev):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev.index or 0, index)
    index.add(xn)
    return index


def exact_self_knn(xn: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k largest inner products of every row of ``xn`` with all rows, itself included.

    The Gram matrix ``xn xnᵀ`` is symmetric, so only its ``block``×``block`` tiles on and above the
    diagonal are computed (half of ``IndexFlatIP.search(xn, k)``'s GEMM work); each tile feeds
    faiss's heaps of its rows and, transposed, of its columns. Tiles come from faiss's BLAS as
    squared L2 distances (= 2 − 2·ip for unit rows; faiss's OpenMP threads do the GEMM and the heaps,
    so no second thread pool competes with them), hence the unit-norm precondition.

    Args:
        xn: N×D float32 C-contiguous, every row of unit L2 norm.
        k: neighbours per row (≤ N).
    Returns:
        (inner products N×k float32 in descending order, ids N×k int64); same sets as
        ``IndexFlatIP`` up to ties.
    """
    n, d = xn.shape
    dis = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    heaps = faiss.float_maxheap_array_t()  # keeps the k smallest distances per row
    heaps.nh, heaps.k = n, k
    heaps.val, heaps.ids = faiss.swig_ptr(dis), faiss.swig_ptr(ids)
    heaps.heapify()
    # Reused tile buffers: fresh 64 MiB allocations would be page-faulted in every tile.
    tile = np.empty(min(block, n) ** 2, np.float32)
    tile_t = torch.empty(min(block, n) ** 2)
    for i0 in range(0, n, block):
        xi = xn[i0 : i0 + block]
        for j0 in range(i0, n, block):
            xj = xn[j0 : j0 + block]
            s = tile[: len(xi) * len(xj)].reshape(len(xi), len(xj))
            faiss.pairwise_L2sqr(d, len(xi), faiss.swig_ptr(xi), len(xj), faiss.swig_ptr(xj), faiss.swig_ptr(s))
            heaps.addn(len(xj), faiss.swig_ptr(s), j0, i0, len(xi))
            if j0 > i0:
                st = tile_t[: s.size].view(len(xj), len(xi))
                st.copy_(torch.from_numpy(s).T)  # torch: a blocked, threaded transpose
                heaps.addn(len(xi), faiss.swig_ptr(st.numpy()), i0, j0, len(xj))
    heaps.reorder()
    return 1.0 - 0.5 * dis, ids
