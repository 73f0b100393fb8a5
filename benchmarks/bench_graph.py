"""Benchmark of the graph long-tail OOD method (issue 5): kNN graph and GCN training speed.

Measures side by side, in one run, on synthetic clustered features (N nodes, D = 512, 10 classes):

1. cosine kNN graph (k = 7 incl. self): oodlib's exact search (torch GEMM tiles of the upper
   triangle of the Gram matrix into faiss heaps, :func:`oodlib.faiss_index.exact_self_knn`) vs scikit-learn
   ``NearestNeighbors(algorithm="brute", metric="cosine")`` with its defaults — time ratio and
   identical neighbour sets (rows that differ must differ only by ties: equal similarity values);
   faiss's plain ``IndexFlatIP`` search and oodlib's ``FlatIP`` (no symmetry) for comparison;
   recall and time of the IVF / HNSW indexes.
2. GCN training epoch (3 layers, hidden 512, CE + 0.5·OE; median over epochs after warm-up): oodlib's
   ``train_full_batch`` vs torch-geometric's default ``GCNConv(x, edge_index)`` path with the same
   weights (outputs compared; F.relu/F.dropout; same allocator setting), and vs the same-size MLP
   (= the dense X·W work) → aggregation overhead.
3. 200 epochs incl. graph build: extrapolated from the measured epochs (``--train-full`` runs them).
4. Peak memory (VmHWM) of graph build + training, measured in a child process.

Usage: ``.venv/bin/python benchmarks/bench_graph.py [--quick] [--train-full]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch

warnings.filterwarnings("ignore")

from oodlib.faiss_index import inner_product_index, l2_normalize
from oodlib.longtail.network import GraphNet, GraphNetConfig
from oodlib.longtail.training import TrainConfig, node_loss, train_full_batch
from oodlib.memory import reuse_freed_memory
from oodlib.longtail.knn_graph import (
    cosine_knn,
    knn_edge_index,
    neighbour_recall,
    normalized_adjacency,
)

D, C, K = 512, 10, 7


def synthetic(n: int, seed: int = 0):
    """Clustered features N×D, labels, train/OE masks (80% train-ID, 10% OE, 10% val)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    x = (rng.standard_normal((C, D))[y] + 2.0 * rng.standard_normal((n, D))).astype(np.float32)
    role = rng.choice(3, n, p=[0.8, 0.1, 0.1])
    return x, y, role == 0, role == 1


def timed(fn, repeats: int):
    """(min seconds, last result) over ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def same_up_to_ties(x: np.ndarray, idx: np.ndarray, ref: np.ndarray, tol: float = 1e-6) -> tuple[float, float]:
    """(fraction of rows with identical neighbour sets, fraction whose sets are identical or differ
    only by ties: equal sorted cosine similarities, in float64, within ``tol``)."""
    same = (np.sort(idx, 1) == np.sort(ref, 1)).all(1)
    rows = np.flatnonzero(~same)
    xn = x[rows].astype(np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    def sims(nbrs):
        y = x[nbrs[rows]].astype(np.float64)
        return np.sort(np.einsum("rd,rkd->rk", xn, y / np.linalg.norm(y, axis=2, keepdims=True)), 1)
    ties = np.abs(sims(idx) - sims(ref)).max(1, initial=0) <= tol if len(rows) else np.zeros(0, bool)
    return float(same.mean()), float((same.sum() + ties.sum()) / len(x))


def bench_knn(x: np.ndarray, n_sklearn: int, repeats: int, flat_ip: bool) -> dict:
    from sklearn.neighbors import NearestNeighbors

    xs = x[:n_sklearn]
    t_ours, (_, idx) = timed(lambda: cosine_knn(xs, K, device="cpu"), repeats)
    t_sk, ref = timed(  # scikit-learn defaults otherwise (n_jobs=None)
        lambda: NearestNeighbors(n_neighbors=K, algorithm="brute", metric="cosine").fit(xs).kneighbors(xs)[1], 1
    )
    same, same_or_ties = same_up_to_ties(xs, idx, ref)
    out = {"n": n_sklearn, "t_ours": t_ours, "t_sklearn": t_sk, "same_rows": same, "same_or_ties": same_or_ties}
    if flat_ip:  # exact searches without the symmetric tiling: faiss's own, and oodlib's FlatIP
        xn = l2_normalize(xs)

        def faiss_flat_search():
            index = faiss.IndexFlatIP(xn.shape[1])
            index.add(xn)
            return index.search(xn, K)

        out["t_flat_ip"], _ = timed(faiss_flat_search, 1)
        out["t_flat_torch"], _ = timed(lambda: inner_product_index(xn, "flat", device="cpu").search(xn, K), 1)
    t_ivf, (_, ivf) = timed(lambda: cosine_knn(xs, K, index="ivf", nprobe=16, device="cpu"), 1)
    t_hnsw, (_, hnsw) = timed(lambda: cosine_knn(xs, K, index="hnsw", ef_search=128, device="cpu"), 1)
    return {**out, "t_ivf": t_ivf, "recall_ivf": neighbour_recall(ivf, idx),
            "t_hnsw": t_hnsw, "recall_hnsw": neighbour_recall(hnsw, idx)}


class PygGCN(torch.nn.Module):
    """The same network on torch-geometric's default path (edge_index, gcn_norm per call, scatter)."""

    def __init__(self, ours: GraphNet) -> None:
        from torch_geometric.nn import GCNConv

        super().__init__()
        dims = [(c.in_channels, c.out_channels) for c in ours.layers]
        self.layers = torch.nn.ModuleList(GCNConv(i, o) for i, o in dims)
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm1d(b.num_features) for b in ours.bns)
        self.load_state_dict(ours.state_dict())
        self.dropout = ours.cfg.dropout

    def forward(self, x, edge_index):
        h = x
        for i, conv in enumerate(self.layers):
            h = self.bns[i](conv(h, edge_index))
            if i < len(self.layers) - 1:
                h = torch.nn.functional.dropout(torch.relu(h), self.dropout, self.training)
        return h, None


WARMUP = 3  # epochs left out of the per-epoch medians (the first epochs fault the heap in)


def pyg_epoch_time(net, x, edge_index, y, train, oe, repeats: int) -> float:
    """Median seconds of one training epoch of the torch-geometric reference (forward, CE + 0.5·OE,
    backward, Adam step) after one warm-up epoch, under the allocator setting of oodlib's training."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    net.train()
    times = []
    with reuse_freed_memory():
        for _ in range(1 + repeats):
            t = time.perf_counter()
            logits, _ = net(x, edge_index)
            loss, _, _ = node_loss(logits, y, train, oe, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def ours_epoch_time(kind: str, x, y, train, oe, adj, epochs: int) -> float:
    """Median epoch seconds of oodlib's full-batch training (``train_full_batch``) of a ``kind`` net,
    over ``epochs`` epochs after :data:`WARMUP` warm-up epochs."""
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(D, C, kind=kind))
    hist = train_full_batch(net, x, y, train, oe, adj, TrainConfig(epochs=WARMUP + epochs))
    return statistics.median(h["seconds"] for h in hist[WARMUP:])


def bench_gcn(x: np.ndarray, y: np.ndarray, train: np.ndarray, oe: np.ndarray, repeats: int, pyg_repeats: int) -> dict:
    n = len(x)
    t_graph, ei = timed(lambda: knn_edge_index(cosine_knn(x, K, device="cpu")[1]), 1)
    t_adj, adj = timed(lambda: normalized_adjacency(ei, n), 1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tr, o = torch.from_numpy(train), torch.from_numpy(oe)
    torch.manual_seed(0)
    ours = GraphNet(GraphNetConfig(D, C))
    pyg = PygGCN(ours)
    with torch.no_grad():
        ours.eval(), pyg.eval()
        max_diff = float((ours(xt, adj)[0] - pyg(xt, ei)[0]).abs().max())
    t_ax, _ = timed(lambda: torch.sparse.mm(adj, xt), 1)
    t_ours = ours_epoch_time("gcn", xt, yt, tr, o, adj, repeats)
    t_mlp = ours_epoch_time("mlp", xt, yt, tr, o, None, repeats)
    t_pyg = pyg_epoch_time(pyg, xt, ei, yt, tr, o, pyg_repeats)
    return {"n": n, "edges": int(ei.shape[1]), "t_graph": t_graph, "t_adj": t_adj, "t_ax": t_ax,
            "max_diff": max_diff, "t_ours": t_ours, "t_mlp": t_mlp, "t_pyg": t_pyg}


def peak_rss_gib() -> float:
    """Peak resident memory (GiB) of this process's address space: VmHWM. (``ru_maxrss`` is not
    used: Linux carries the parent's peak over into a spawned child's.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def child_peak_memory(n: int, epochs: int) -> dict:
    """Run graph build + ``epochs`` training epochs in a fresh process; its max RSS (GiB) and time."""
    code = (
        "import json, time, torch, sys\n"
        "sys.argv=['x']\n"
        "import benchmarks.bench_graph as b\n"
        f"x, y, tr, oe = b.synthetic({n})\n"
        "t = time.perf_counter()\n"
        "ei = b.knn_edge_index(b.cosine_knn(x, b.K, device='cpu')[1]); adj = b.normalized_adjacency(ei, len(x))\n"
        "torch.manual_seed(0); net = b.GraphNet(b.GraphNetConfig(b.D, b.C))\n"
        f"h = b.train_full_batch(net, torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(tr),"
        f" torch.from_numpy(oe), adj, b.TrainConfig(epochs={epochs}))\n"
        "print(json.dumps({'rss_gib': b.peak_rss_gib(),"
        " 'seconds': time.perf_counter() - t, 'final_loss': h[-1]['loss'],"
        " 'epoch_median': sorted(e['seconds'] for e in h)[len(h) // 2]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sklearn comparison and fewer repeats")
    ap.add_argument("--train-full", action="store_true", help="also run all 200 epochs (child process)")
    args = ap.parse_args()
    n = 50_000
    n_sk = 20_000 if args.quick else n
    x, y, train, oe = synthetic(n)
    knn = bench_knn(x, n_sk, repeats=1 if args.quick else 2, flat_ip=not args.quick)
    gcn = bench_gcn(x, y, train, oe, repeats=3 if args.quick else 6, pyg_repeats=2 if args.quick else 3)
    mem_epochs = 200 if args.train_full else 3
    mem = child_peak_memory(n, mem_epochs)
    t200 = mem["seconds"] if args.train_full else gcn["t_graph"] + gcn["t_adj"] + gcn["t_ax"] + 200 * gcn["t_ours"]
    speed_knn = knn["t_sklearn"] / knn["t_ours"]
    speed_gcn = gcn["t_pyg"] / gcn["t_ours"]
    overhead = gcn["t_ours"] / gcn["t_mlp"] - 1
    rows = [
        (f"kNN graph N={knn['n']:,}, D=512, k=7: sklearn brute cosine / oodlib exact (faiss)",
         f"{knn['t_sklearn']:.1f} s / {knn['t_ours']:.1f} s = {speed_knn:.1f}x", ">= 5x", speed_knn >= 5),
        ("identical neighbour sets: rows identical / identical up to ties",
         f"{knn['same_rows']:.5f} / {knn['same_or_ties']:.5f}", "1.0 up to ties", knn["same_or_ties"] == 1.0),
    ]
    if "t_flat_ip" in knn:
        rows.append(("faiss IndexFlatIP.search / oodlib FlatIP.search (no symmetry), for comparison",
                     f"{knn['t_flat_ip']:.1f} s / {knn['t_flat_torch']:.1f} s", "reported", True))
    rows += [
        ("approx IVF (nprobe 16) recall@7 / time", f"{knn['recall_ivf']:.4f} / {knn['t_ivf']:.1f} s", "reported", True),
        ("approx HNSW (M 32, ef 128) recall@7 / time", f"{knn['recall_hnsw']:.4f} / {knn['t_hnsw']:.1f} s", "reported",
         True),
        (f"GCN epoch N=50,000 ({gcn['edges']:,} edges): PyG default / oodlib (steady-state medians)",
         f"{gcn['t_pyg']:.2f} s / {gcn['t_ours']:.2f} s = {speed_gcn:.1f}x", ">= 3x", speed_gcn >= 3),
        ("same outputs (max |logit diff|, eval)", f"{gcn['max_diff']:.2e}", "<= 1e-3", gcn["max_diff"] <= 1e-3),
        ("sparse aggregation on top of dense X·W (GCN vs same-size MLP epoch)",
         f"{gcn['t_ours']:.2f} s vs {gcn['t_mlp']:.2f} s = {100 * overhead:+.0f}%", "<= 50%", overhead <= 0.5),
        ((f"200 epochs incl. graph build ({'measured' if args.train_full else 'extrapolated'}; "
         f"median epoch {mem['epoch_median'] if args.train_full else gcn['t_ours']:.2f} s)"), f"{t200 / 60:.1f} min", "< 8 min", t200 < 480),
        (f"peak memory, graph build + {mem_epochs} epochs (VmHWM)", f"{mem['rss_gib']:.2f} GiB", "reported", True),
    ]
    print(f"\n## bench_graph ({'quick' if args.quick else 'full'}; torch threads {torch.get_num_threads()}, "
          f"faiss threads {faiss.omp_get_max_threads()}; "
          f"graph {gcn['t_graph']:.1f} s, Â {gcn['t_adj']:.2f} s, Â·x {gcn['t_ax']:.2f} s)\n")
    print("| measure | value | target | result |\n|---|---|---|---|")
    for name, value, target, ok in rows:
        print(f"| {name} | {value} | {target} | {'PASS' if ok else 'FAIL'} |")
    print(f"\npeak RSS of this process (VmHWM): {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
