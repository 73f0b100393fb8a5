"""End to end on the embedded benchmark: digits-lt100 train, OE = part of photo-patches + noise,
test OOD = digits-near (and the held-out photo patches)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from oodlib.data.longtail import class_counts
from oodlib.longtail import GraphOOD, gaussianize, neighbour_stats
from oodlib.metrics import head_tail_accuracy


@pytest.fixture(scope="module")
def run(digits_model, digits_inputs):
    x_lt, y_lt = digits_inputs[("digits-lt100", "train")]
    g = gaussianize(digits_model, x_lt, device="cpu")
    photo, noise = digits_inputs[("photo-patches", "test")][0], digits_inputs[("noise", "test")][0]
    with torch.no_grad():
        feats = lambda x: g.features(x).numpy()
        oe = np.concatenate([feats(photo[:150]), feats(noise[:150])])
        val, y_val = feats(digits_inputs[("digits", "val")][0]), digits_inputs[("digits", "val")][1]
        test, y_test = feats(digits_inputs[("digits", "test")][0]), digits_inputs[("digits", "test")][1]
        ood = {"digits-near": feats(digits_inputs[("digits-near", "test")][0]), "photo-patches": feats(photo[150:])}
        nodes = np.concatenate([feats(x_lt), oe, val])
    labels = np.concatenate([y_lt, -np.ones(len(oe), int), y_val])
    role = np.array(["train"] * len(x_lt) + ["oe"] * len(oe) + ["val"] * len(val))
    est = GraphOOD(hidden=64, epochs=80, seed=0, device="cpu").fit(nodes, labels, role)
    return est, nodes, labels, test, y_test, ood, class_counts(y_lt, 8)


def auroc(score_id, score_ood):
    return roc_auc_score(np.r_[np.ones(len(score_id)), np.zeros(len(score_ood))], np.r_[score_id, score_ood])


def test_sane_ood_detection_and_accuracy(run):
    est, _, _, test, y_test, ood, counts = run
    assert est.history_["loss"][-1] < est.history_["loss"][0]
    aurocs = {}
    for name, x_ood in ood.items():
        out = est.predict(np.concatenate([test, x_ood]))  # inductive graph: test-ID ∪ this OOD set
        assert out["score"].dtype == np.float32 and out["embedding"].shape == (len(test) + len(x_ood), 64)
        assert ((out["score"] >= 1 / 8 - 1e-6) & (out["score"] <= 1 + 1e-6)).all()
        aurocs[name] = auroc(out["score"][: len(test)], out["score"][len(test) :])
        acc = head_tail_accuracy(y_test, out["pred"][: len(test)], counts)
    assert aurocs["digits-near"] > 0.6 and aurocs["photo-patches"] > 0.75, aurocs
    assert acc["acc"] > 0.6 and acc["acc_head"] > acc["acc_tail"], acc


def test_batch_inference_and_persistence(run, tmp_path):
    est, _, _, test, _, ood, _ = run
    x = np.concatenate([test, ood["digits-near"]])
    full = est.predict(x)
    single = est.predict(x, batch_size=len(x))  # one batch = the full graph, permuted rows
    np.testing.assert_allclose(single["score"], full["score"], rtol=1e-5, atol=1e-6)
    batched = est.predict(x, batch_size=128, seed=1)
    assert np.isfinite(batched["score"]).all() and not np.allclose(batched["score"], full["score"])
    est.save(tmp_path / "gcn.safetensors")
    back = GraphOOD.load(tmp_path / "gcn.safetensors")
    assert back.params() == est.params()
    np.testing.assert_array_equal(back.predict(x)["score"], full["score"])


def test_training_graph_neighbour_table(run):
    est, nodes, labels, _, _, _, counts = run
    stats = neighbour_stats(est.edge_index_, labels, counts)
    assert len(stats) == len(nodes)
    assert (stats["n_head"] + stats["n_tail"] + stats["n_ood"] == stats["degree"]).all()
    assert (stats["degree"] >= 6).all()  # k = 7 including self: at least 6 other neighbours
    ood_rows = stats[stats.group == "ood"]
    assert ood_rows["n_ood"].mean() > ood_rows["n_head"].mean()  # outliers cluster together
