"""kNN graph and normalized adjacency against brute force, dense formulas and torch-geometric."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oodlib.faiss_index import exact_self_knn, inner_product_index, l2_normalize
from oodlib.longtail.knn_graph import (
    cosine_knn,
    cosine_knn_graph,
    knn_edge_index,
    neighbour_recall,
    normalized_adjacency,
    random_batches,
)


def brute_cosine_knn(x: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # zero rows stay zero
    sims = xn.astype(np.float64) @ xn.T.astype(np.float64)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    return rng.standard_normal((400, 24)).astype(np.float32)


def test_exact_knn_equals_brute_force(points):
    sims, idx = cosine_knn(points, k=7)
    ref = brute_cosine_knn(points, 7)
    assert (np.sort(idx, 1) == np.sort(ref, 1)).all()
    assert (idx[:, 0] == np.arange(len(points))).all()  # self is the nearest, included in k
    xn = points / np.linalg.norm(points, axis=1, keepdims=True)
    np.testing.assert_allclose(sims, np.take_along_axis(xn @ xn.T, idx, 1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_symmetric_tiled_search_equals_faiss_flat_and_brute_force(points):
    xn = l2_normalize(points[:203])
    sims, idx = exact_self_knn(xn, k=6, block=64)  # 4×4 tiles, partial last row/column of tiles
    ref_sims, ref_idx = faiss_flat(xn).search(xn, 6)
    assert (np.sort(idx, 1) == np.sort(ref_idx, 1)).all()
    assert (np.sort(idx, 1) == np.sort(brute_cosine_knn(points[:203], 6), 1)).all()
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def faiss_flat(xn: np.ndarray):
    """faiss's own exact inner-product index (the oracle for oodlib's CPU search)."""
    import faiss

    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    return index


def test_flat_ip_search_equals_faiss_and_brute_force(points):
    """FlatIP (torch GEMM tiles into faiss heaps): queries against another set, several query
    tiles (block 40 → 4 queries a tile over 400 rows, the last one partial)."""
    from oodlib.faiss_index import FlatIP

    xb, xq = l2_normalize(points), l2_normalize(points[::3] + 0.1)
    index = inner_product_index(xb, "flat", device="cpu")
    assert isinstance(index, FlatIP)
    for search in (index.search, FlatIP(xb, block=40).search):
        sims, idx = search(xq, 9)
        ref_sims, ref_idx = faiss_flat(xb).search(xq, 9)
        brute = np.argsort(-(xq.astype(np.float64) @ xb.T.astype(np.float64)), axis=1, kind="stable")[:, :9]
        assert (np.sort(idx, 1) == np.sort(ref_idx, 1)).all() and (np.sort(idx, 1) == np.sort(brute, 1)).all()
        np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
        assert (np.diff(sims, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="k=401 exceeds the 400 indexed rows"):
        index.search(xq, 401)


def test_zero_rows_have_similarity_zero(points):
    x = points.copy()
    x[3] = 0.0
    sims, idx = cosine_knn(x, k=5)
    ref = brute_cosine_knn(x, 5)
    others = np.arange(len(x)) != 3
    assert (np.sort(idx[others], 1) == np.sort(ref[others], 1)).all()  # top-5 sims are > 0 here
    assert 3 in idx[3] and np.all(sims[3] == 0.0)


def test_duplicates_keep_a_self_loop():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 4 identical copies of each point
    _, idx = cosine_knn(x, k=2)
    assert (idx == np.arange(12)[:, None]).any(axis=1).all()


def test_edge_index_is_undirected_unique_sorted():
    nbrs = np.array([[0, 1], [1, 0], [2, 1], [3, 2]])
    ei = knn_edge_index(nbrs).numpy()
    expected = {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 1), (1, 2), (3, 3), (3, 2), (2, 3)}
    assert set(map(tuple, ei.T)) == expected and ei.shape[1] == len(expected)
    keys = ei[0] * 4 + ei[1]
    assert (np.diff(keys) > 0).all()


def test_graph_matches_brute_force_symmetrized(points):
    ei = cosine_knn_graph(points, k=5).numpy()
    ref = brute_cosine_knn(points, 5)
    dense = np.zeros((len(points),) * 2, bool)
    dense[np.repeat(np.arange(len(points)), 5), ref.ravel()] = True
    dense |= dense.T
    got = np.zeros_like(dense)
    got[ei[0], ei[1]] = True
    assert (got == dense).all()


def test_normalized_adjacency_dense_and_pyg(points):
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    n = 60
    ei = cosine_knn_graph(points[:n], k=4)
    adj = normalized_adjacency(ei, n).to_dense().numpy()
    a = np.zeros((n, n))
    a[ei[0].numpy(), ei[1].numpy()] = 1.0
    d = a.sum(1)
    np.testing.assert_allclose(adj, a / np.sqrt(np.outer(d, d)), rtol=1e-6)
    ei_pyg, w = gcn_norm(ei, num_nodes=n)
    ref = torch.sparse_coo_tensor(ei_pyg, w, (n, n)).to_dense().numpy()
    np.testing.assert_allclose(adj, ref, rtol=1e-5)


def test_normalized_adjacency_adds_missing_self_loops():
    ei = torch.tensor([[0, 1], [1, 0]])
    adj = normalized_adjacency(ei, 3).to_dense().numpy()
    np.testing.assert_allclose(adj, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])


def test_ivf_with_every_cell_probed_is_exact_and_hnsw_recall(points):
    _, exact = cosine_knn(points, k=7)
    _, ivf = cosine_knn(points, k=7, index="ivf", nlist=8, nprobe=8)
    assert neighbour_recall(ivf, exact) == 1.0
    _, hnsw = cosine_knn(points, k=7, index="hnsw", ef_search=256)
    assert neighbour_recall(hnsw, exact) > 0.95


def test_neighbour_recall_hand_case():
    assert neighbour_recall(np.array([[0, 1], [1, 5]]), np.array([[0, 2], [1, 2]])) == 0.5


def test_random_batches_partition():
    parts = random_batches(10, 4, seed=3)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert all((a == b).all() for a, b in zip(parts, random_batches(10, 4, seed=3)))
