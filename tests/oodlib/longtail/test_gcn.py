"""GCN layers against dense Â·X·W and torch-geometric's default path; OE loss; sampling; I/O."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch_geometric.nn import GCNConv

from oodlib.estimator import NotFittedError
from oodlib.longtail.detector import GraphOOD
from oodlib.longtail.network import GraphNet, GraphNetConfig, aggregate, relu_dropout
from oodlib.longtail.training import (
    TrainConfig,
    oe_loss,
    sample_subgraph,
    train_full_batch,
    train_sampled,
)
from oodlib.longtail.knn_graph import cosine_knn_graph, normalized_adjacency


@pytest.fixture(scope="module")
def graph():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    x = (rng.standard_normal((3, 16))[y] + 0.8 * rng.standard_normal((120, 16))).astype(np.float32)
    ei = cosine_knn_graph(x, k=7)
    return torch.from_numpy(x), torch.from_numpy(y), ei, normalized_adjacency(ei, len(x))


def test_gcnconv_with_cached_adjacency_equals_dense_and_pyg_default(graph):
    x, _, ei, adj = graph
    torch.manual_seed(0)
    conv = GCNConv(16, 8, normalize=False)
    torch.nn.init.normal_(conv.bias)
    ref_conv = GCNConv(16, 8)  # default path: edge_index, gcn_norm each call, scatter aggregation
    ref_conv.load_state_dict(conv.state_dict())
    dense = adj.to_dense() @ (x @ conv.lin.weight.T) + conv.bias
    out = conv(x, adj)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_conv(x, ei), rtol=1e-5, atol=1e-5)
    # first-layer cache: GCNConv(x, Â) == (Â x) W + b
    torch.testing.assert_close(conv.lin(torch.sparse.mm(adj, x)) + conv.bias, out, rtol=1e-5, atol=1e-5)


def test_graphnet_eval_forward_matches_manual(graph):
    x, _, _, adj = graph
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(16, 3, hidden=8))
    for bn in net.bns:  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    a = adj.to_dense()

    def bn(i, h):
        m = net.bns[i]
        return (h - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    h = x
    for i, conv in enumerate(net.layers):
        h = bn(i, a @ h @ conv.lin.weight.T + conv.bias)
        if i < 2:
            h = torch.relu(h)
            emb = h
    logits, embedding = net(x, adj)
    torch.testing.assert_close(logits, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embedding, emb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net(x, adj, torch.sparse.mm(adj, x))[0], logits, rtol=1e-5, atol=1e-5)


def _pyg_reference(net: GraphNet) -> torch.nn.Module:
    """The same network on torch-geometric's default path: GCNConv(h, edge_index), F.relu, F.dropout."""

    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(GCNConv(c.in_channels, c.out_channels) for c in net.layers)
            self.bns = torch.nn.ModuleList(torch.nn.BatchNorm1d(b.num_features) for b in net.bns)

        def forward(self, x, ei):
            h = x
            for i, conv in enumerate(self.layers):
                h = self.bns[i](conv(h, ei))
                if i < len(self.layers) - 1:
                    h = F.dropout(F.relu(h), net.cfg.dropout, self.training)
            return h

    ref = Ref()
    ref.load_state_dict(net.state_dict())
    return ref


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def test_training_forward_and_gradients_equal_pyg_default_path(graph):
    x, _, ei, adj = graph
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(16, 3, hidden=8, dropout=0.0)).train()
    ref = _pyg_reference(net).train()
    w = torch.randn(len(x), 3)
    out, ref_out = net(x, adj)[0], ref(x, ei)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    g, ref_g = _grads(net, (out * w).sum()), _grads(ref, (ref_out * w).sum())
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-5)


def test_cached_first_layer_equals_uncached_forward_and_gradients(graph):
    x, _, _, adj = graph
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(16, 3, hidden=8)).train()  # dropout 0.6: same masks via the same seed
    w = torch.randn(len(x), 3)
    results = []
    for ax in (None, torch.sparse.mm(adj, x)):
        torch.manual_seed(1)
        logits, emb = net(x, adj, ax)
        results.append((logits, emb, _grads(net, (logits * w).sum())))
    (l0, e0, g0), (l1, e1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_aggregate_forward_and_gradients_equal_dense(graph, symmetric):
    adj = graph[3]
    if not symmetric:  # a neighbour-sampled sub-adjacency (rows rescaled, not symmetric)
        _, adj = sample_subgraph(adj, torch.arange(30), (2, 2), torch.Generator().manual_seed(0))
    n = adj.shape[0]
    a = adj.to_dense()
    assert symmetric == bool((a == a.T).all())
    h = torch.randn(n, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    w = torch.randn(n, 5)
    out = aggregate(adj, h, b, None if symmetric else adj.t().to_sparse_csr())
    torch.testing.assert_close(out, a @ h + b, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad((out * w).sum(), (h, b))
    want = torch.autograd.grad(((a @ h + b) * w).sum(), (h, b))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_relu_dropout_distribution_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(400, 500, requires_grad=True)
    p = 0.6
    out = relu_dropout(h, p, training=True)
    relu = torch.relu(h.detach())
    kept = out != 0
    torch.testing.assert_close(out[kept], relu[kept] / (1 - p))  # kept entries are scaled by 1/(1−p)
    assert not kept[relu == 0].any()
    frac = kept[relu > 0].float().mean().item()  # ~100k Bernoulli(0.4) draws: std 0.0015
    assert abs(frac - (1 - p)) < 0.01
    w = torch.randn_like(h)
    (grad,) = torch.autograd.grad((out * w).sum(), h)
    torch.testing.assert_close(grad, torch.where(kept, w / (1 - p), 0.0))
    torch.testing.assert_close(relu_dropout(h, p, training=False), torch.relu(h))


def test_mlp_has_the_gcn_parameter_count():
    count = lambda kind: sum(p.numel() for p in GraphNet(GraphNetConfig(512, 10, kind=kind)).parameters())
    assert count("mlp") == count("gcn") == 512 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10 + 2 * (2 * 512) + 2 * 10
    assert count("linear") == 512 * 10 + 10


def test_oe_loss_formula():
    assert math.isclose(float(oe_loss(torch.zeros(1, 4))), math.log(4), rel_tol=1e-6)
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    by_hand = np.mean([math.log(sum(math.exp(v) for v in row)) - np.mean(row) for row in z.tolist()])
    assert math.isclose(float(oe_loss(z)), by_hand, rel_tol=1e-6)
    uniform = torch.full_like(z, 1 / 3)
    torch.testing.assert_close(oe_loss(z), F.cross_entropy(z, uniform))


def test_full_batch_training_learns(graph):
    x, y, _, adj = graph
    train = torch.arange(len(x)) < 90
    oe = torch.zeros(len(x), dtype=torch.bool)
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(16, 3, hidden=32))
    hist = train_full_batch(net, x, y, train, oe, adj, TrainConfig(epochs=60, lr=1e-2))
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    acc = (net(x, adj)[0].argmax(1) == y)[~train].float().mean()
    assert acc > 0.8 and not net.training


def test_sampled_subgraph_with_full_fanout_is_exact(graph):
    x, _, _, adj = graph
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(16, 3, hidden=8)).eval()
    seeds = torch.tensor([5, 17, 40])
    nodes, sub = sample_subgraph(adj, seeds, (1000, 1000), torch.Generator().manual_seed(0))
    assert (nodes[:3] == seeds).all() and len(torch.unique(nodes)) == len(nodes)
    ax = torch.sparse.mm(adj, x)
    got = net(x[nodes], sub, ax[nodes])[0][:3]
    torch.testing.assert_close(got, net(x, adj)[0][seeds], rtol=1e-4, atol=1e-5)


def test_sampled_subgraph_respects_fanout(graph):
    _, _, _, adj = graph
    seeds = torch.arange(10)
    _nodes, sub = sample_subgraph(adj, seeds, (2,), torch.Generator().manual_seed(1))
    d = sub.to_dense()
    per_row = (d[:10] != 0).sum(1) - 1  # minus the self-loop
    full = (adj.to_dense()[:10] != 0).sum(1) - 1
    assert (per_row == torch.minimum(full, torch.tensor(2))).all()
    # rescaled rows keep the full row's sum of neighbour weights in expectation; exact for rows with ≤ 2
    assert (d[10:].count_nonzero(1) == 1).all()


def test_sampled_training_runs_and_learns(graph):
    x, y, _, adj = graph
    train = torch.ones(len(x), dtype=torch.bool)
    torch.manual_seed(0)
    net = GraphNet(GraphNetConfig(16, 3, hidden=32))
    tc = TrainConfig(epochs=15, lr=1e-2, fanouts=(3, 3), batch_size=32)
    hist = train_sampled(net, x, y, train, ~train, adj, tc)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (net(x, adj)[0].argmax(1) == y).float().mean() > 0.8


def _nodes(graph):
    """The module graph as estimator input: features, labels (−1 on OE nodes) and roles."""
    x, y, _, _ = graph
    role = np.array(["train"] * 80 + ["oe"] * 20 + ["val"] * 20)
    return x.numpy(), np.where(role == "oe", -1, y.numpy()), role


@pytest.mark.parametrize("variant", GraphOOD.contract_variants() + [{"fanouts": [3, 3], "batch_size": 32, "epochs": 2}],
                         ids=lambda v: v["kind"] if "kind" in v else "sampled")
def test_estimator_save_load_roundtrip_predicts_identically(graph, tmp_path, variant):
    x, labels, role = _nodes(graph)
    est = GraphOOD(device="cpu", **variant).fit(x, labels, role)
    assert est.fit(x, labels, role) is est
    back = GraphOOD.load(est.save(tmp_path / "g.safetensors"))
    assert back.params() == est.params() and back.fanouts == est.fanouts
    assert back.num_classes_ == est.num_classes_ == 3 and back.in_dim_ == est.in_dim_ == 16
    np.testing.assert_array_equal(back.edge_index_, est.edge_index_)
    np.testing.assert_array_equal(back.history_["loss"], est.history_["loss"])
    want, got = est.predict(x), back.predict(x)
    for key in ("score", "pred", "logits", "embedding"):
        np.testing.assert_array_equal(got[key], want[key])
    want, got = est.predict(x, batch_size=50, seed=1), back.predict(x, batch_size=50, seed=1)
    np.testing.assert_array_equal(got["score"], want["score"])


def test_estimator_contract_attributes(graph):
    x, labels, role = _nodes(graph)
    sampled = GraphOOD(fanouts=[2, 2], batch_size=16)
    assert sampled.fanouts == (2, 2) and sampled.params()["fanouts"] == [2, 2] and sampled.device == "auto"
    assert GraphOOD(**sampled.params()).params() == sampled.params()
    est = GraphOOD(kind="linear", epochs=2, hidden=8, device="cpu")
    assert not est.is_fitted and not est.fitted_attributes()
    est.fit(x, labels, role)
    assert sorted(est.fitted_attributes()) == ["edge_index_", "history_", "in_dim_", "num_classes_", "weights_"]
    assert est.edge_index_.shape == (2, 0)  # no graph for the linear probe


def test_unfitted_predict_raises(graph):
    x, _, _ = _nodes(graph)
    with pytest.raises(NotFittedError):
        GraphOOD(device="cpu").predict(x)
