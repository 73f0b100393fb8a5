"""Inner-product faiss indexes over L2-normalized rows (cosine similarity), shared by the KNN
detector and the kNN graph.

``kind``: ``"flat"`` (exact: BLAS GEMM + heap selection), ``"ivf"`` (IVF-Flat, nlist ≈ 4·√N,
trained on ≤ 256·nlist seeded rows, ``nprobe`` cells searched), ``"hnsw"`` (HNSW, degree
``hnsw_m``, search breadth ``ef_search``; CPU only), or ``"auto"`` = exact up to
:data:`EXACT_MAX_ROWS` rows, IVF above. On a CUDA device with faiss-gpu installed, flat and IVF
indexes move to the GPU.
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
    if dev.type == "cuda" and kind != "hnsw" and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), dev.index or 0, index)
    index.add(xn)
    return index
