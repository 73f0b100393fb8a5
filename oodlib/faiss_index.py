"""Inner-product faiss indexes over L2-normalized rows (cosine similarity), shared by the KNN
detector and the kNN graph.

``kind``: ``"flat"`` (exact: GEMM + heap selection; on the CPU :class:`FlatIP`), ``"ivf"`` (IVF-Flat, nlist ≈ 4·√N,
trained on ≤ 256·nlist seeded rows, ``nprobe`` cells searched), ``"hnsw"`` (HNSW, degree
``hnsw_m``, search breadth ``ef_search``; CPU only), or ``"auto"`` = exact up to
:data:`EXACT_MAX_ROWS` rows, IVF above. On a CUDA device with faiss-gpu installed, flat and IVF
indexes move to the GPU.

Exact search on the CPU multiplies with torch (MKL) and selects with faiss's heaps: the faiss-cpu
wheels bundle an OpenBLAS (0.3.15) that does not know recent CPUs and falls back to its generic
SSE3 kernel on them — 32 vs 227 GFLOP/s on 2 cores of a Sapphire Rapids Xeon — and
``IndexFlatIP.search`` runs on that BLAS. :func:`exact_self_knn` is the all-rows-against-all-rows
search of a kNN graph, halved by the symmetry of the Gram matrix.
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


class _TopK:
    """faiss heaps keeping the k largest inner products of each of ``n`` rows, fed tile by tile."""

    def __init__(self, n: int, k: int):
        self.dis, self.ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        self.heaps = faiss.float_minheap_array_t()
        self.heaps.nh, self.heaps.k = n, k
        self.heaps.val, self.heaps.ids = faiss.swig_ptr(self.dis), faiss.swig_ptr(self.ids)
        self.heaps.heapify()

    def add(self, tile: torch.Tensor, row0: int, col0: int) -> None:
        """Offer ``tile`` (rows row0…, columns col0… ; C-contiguous float32) to those rows' heaps."""
        self.heaps.addn(tile.shape[1], faiss.swig_ptr(tile.numpy()), col0, row0, tile.shape[0])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(inner products n×k in descending order, ids n×k int64)."""
        self.heaps.reorder()
        return self.dis, self.ids


class FlatIP:
    """Exact inner-product search over the rows of ``xb`` (N×D float32), ``search`` like faiss's
    ``IndexFlatIP``: query tiles × the whole base through one torch GEMM each, into faiss heaps."""

    def __init__(self, xb: np.ndarray, block: int = 4096):
        xb = np.ascontiguousarray(xb, np.float32)
        # a read-only base (e.g. mapped from Ray's object store) is copied once: torch wants writable memory
        self.xb = torch.from_numpy(xb if xb.flags.writeable else xb.copy())
        self.ntotal, self.block = len(xb), block

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner products Q×k, descending; ids Q×k) of the k most similar base rows per query."""
        if k > self.ntotal:
            raise ValueError(f"k={k} exceeds the {self.ntotal} indexed rows")
        xq = torch.from_numpy(np.array(xq, np.float32, order="C"))  # a copy: queries may be read-only
        top = _TopK(len(xq), k)
        rows = max(1, min(len(xq), (self.block * self.block) // max(self.ntotal, 1)))
        tile = torch.empty(rows * self.ntotal)  # reused: fresh large blocks are page-faulted per tile
        for i0 in range(0, len(xq), rows):
            q = xq[i0 : i0 + rows]
            top.add(torch.mm(q, self.xb.T, out=tile[: len(q) * self.ntotal].view(len(q), self.ntotal)), i0, 0)
        return top.result()


def inner_product_index(
    xn: np.ndarray, kind: str = "auto", nlist: int | None = None, nprobe: int = 32, hnsw_m: int = 32,
    ef_search: int = 128, seed: int = 0, device: str | torch.device = "auto",
) -> faiss.Index | FlatIP:
    """A filled inner-product index over the normalized rows ``xn`` (N×D float32): a faiss index,
    or for exact search on the CPU a :class:`FlatIP`; either answers ``search(xq, k)``."""
    n, d = xn.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX_ROWS else "ivf"
    dev = resolve_device(device)
    if kind == "flat" and not faiss_gpu(dev):
        return FlatIP(xn)
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
    if kind != "hnsw" and faiss_gpu(dev):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev.index or 0, index)
    index.add(xn)
    return index


def exact_self_knn(xn: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k largest inner products of every row of ``xn`` with all rows, itself included.

    The Gram matrix ``xn xnᵀ`` is symmetric, so only its ``block``×``block`` tiles on and above the
    diagonal are computed (half of ``IndexFlatIP.search(xn, k)``'s GEMM work); each tile feeds
    faiss's heaps of its rows and, transposed, of its columns (tiles from torch, see the module
    doc). Unit rows make the inner products cosine similarities.

    Args:
        xn: N×D float32 C-contiguous (L2-normalized rows for cosine similarity; zero rows score 0).
        k: neighbours per row (≤ N).
    Returns:
        (inner products N×k float32 in descending order, ids N×k int64); same sets as
        ``IndexFlatIP`` up to ties.
    """
    n = len(xn)
    top = _TopK(n, k)
    xt = torch.from_numpy(xn)
    # Reused tile buffers: fresh 64 MiB allocations would be page-faulted in every tile. (Smaller
    # tiles transpose faster but feed the heaps more slowly on clustered features: N = 50k of
    # bench_graph's data, 9.9 s at 4096, 11.4 s at 2048, 18.9 s at 768.)
    tile = torch.empty(min(block, n) ** 2)
    tile_t = torch.empty(min(block, n) ** 2)
    for i0 in range(0, n, block):
        xi = xt[i0 : i0 + block]
        for j0 in range(i0, n, block):
            xj = xt[j0 : j0 + block]
            s = torch.mm(xi, xj.T, out=tile[: len(xi) * len(xj)].view(len(xi), len(xj)))
            top.add(s, i0, j0)
            if j0 > i0:  # the transposed tile: a blocked, threaded copy
                top.add(tile_t[: s.numel()].view(len(xj), len(xi)).copy_(s.T), j0, i0)
    return top.result()
