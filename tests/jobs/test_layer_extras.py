"""The layer-statistics extras (Gram, layer means, NAC, RankFeat, AdaSCALE) in EMBED without Ray:
``embed_batch`` writes the columns the oodlib functions compute, from one shared pass that also is
the batch's ordinary forward; what they are wanted with, and that their parameters key EMBED."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

import oodlib.layers as L
from jobs.config import parse_config
from jobs.embed_pass import embed_batch
from jobs.extras import ExtraSpec, build_extras, wanted_extras
from jobs.stages.embed import EmbedStage
from oodlib.data.decode import decode_batch
from oodlib.data.manifest import encode_png

DETECTORS = [
    {"name": "gram", "params": {"powers": "1,2"}}, "multi_mahalanobis", "nac", "rankfeat", "adascale_a",
    {"name": "adascale_l", "params": {}},
]


def config(detectors=DETECTORS, model="digits-cnn"):
    return parse_config({"experiment": "x", "model": {"name": model}, "detectors": detectors})


def manifest(digits_sets, n=6) -> pa.Table:
    s = digits_sets[("digits", "test")]
    return pa.table({
        "image_id": [f"img-{i}" for i in range(n)], "dataset": ["digits"] * n, "split": ["test"] * n,
        "label": pa.array(s.labels[:n], pa.int64()), "subset": [None] * n, "batch": [None] * n, "shard": [0] * n,
        "image": pa.array([encode_png(im) for im in s.images[:n]], pa.binary()), "path": [None] * n,
    })


def test_wanted_with_the_extra_params_and_default_layers():
    wanted = wanted_extras(config())
    assert wanted["gram"] == {"layers": ["block1", "block2", "block3"], "powers": [1, 2]}
    assert wanted["layer_means"] == {"layers": ["block1", "block2", "block3"]}
    assert wanted["nac"] == {"layers": ["avgpool", "block2", "block1"]}  # α, O, M, fit_samples stay in FIT
    assert wanted["rankfeat"] == {"layers": ["block3", "block2"], "temperature": 1.0}
    assert wanted["adascale"] == {"k1": 5.0, "k2": 1.0, "o": 0.05}  # λ and the percentiles stay in FIT/SCORE
    assert "odin" not in wanted and wanted_extras(config(["msp"])) == {}
    with pytest.raises(ValueError, match="'gram'.*no default layers for model 'vgg16'"):
        wanted_extras(config(["gram"], model="vgg16"))


def test_embed_batch_columns_equal_the_oodlib_functions(digits_model, digits_sets, monkeypatch):
    batch = manifest(digits_sets)
    specs = tuple(ExtraSpec(n, p) for n, p in wanted_extras(config()).items())
    extras = build_extras(specs, digits_model, torch.device("cpu"))
    calls = []
    real = L.layer_pass
    monkeypatch.setattr(L, "layer_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = embed_batch(digits_model, batch, torch.device("cpu"), extras)
    assert len(calls) == 1  # one shared pass for the five extras, which also gave features and logits
    plain = embed_batch(digits_model, batch, torch.device("cpu"))
    for c in ("features", "logits", "pred"):
        np.testing.assert_allclose(np.array(out.column(c).to_pylist()), np.array(plain.column(c).to_pylist()), rtol=1e-5, atol=1e-6)
    x, _ = decode_batch(batch.column("image").to_pylist(), [None] * batch.num_rows, digits_model.preprocess)
    direct = {
        **L.gram_statistics(digits_model, x, ["block1", "block2", "block3"], [1, 2]),
        **L.layer_means(digits_model, x, ["block1", "block2", "block3"]),
        **L.nac_states(digits_model, x, ["avgpool", "block2", "block1"]),
        "rankfeat": L.rankfeat_score(digits_model, x, ["block3", "block2"]),
        **L.adascale_terms(digits_model, x),
    }
    for column, values in direct.items():
        np.testing.assert_allclose(np.array(out.column(column).to_pylist(), np.float32), values, rtol=1e-5, atol=1e-6, err_msg=column)
    assert out.column("gram_sizes").to_pylist()[0] == [32.0, 64.0, 128.0]
    assert out.column("quarantine_reason").null_count == batch.num_rows


def test_a_missing_layer_fails_naming_the_detector(digits_model):
    with pytest.raises(ValueError, match="'nac'.*no layer.*layer3"):
        build_extras((ExtraSpec("nac", {"layers": ["avgpool", "layer3"]}),), digits_model, torch.device("cpu"))


def test_embed_key_follows_the_extra_params_only(digits_model, digits_sets):
    def key(detectors):
        cfg = config(detectors)
        ctx = SimpleNamespace(cfg=cfg, model_hash="m", model=digits_model)
        return EmbedStage().key(ctx, {"manifest": SimpleNamespace(rows=manifest(digits_sets, 4).drop_columns(["shard"]))})

    base = key(["gram", "nac", "adascale_a"])
    assert key(["gram", "nac", "adascale_a"]) == base
    assert key([{"name": "gram", "params": {"powers": "1,2"}}, "nac", "adascale_a"]) != base
    assert key(["gram", {"name": "nac", "params": {"layers": "avgpool,block1"}}, "adascale_a"]) != base
    assert key(["gram", "nac", {"name": "adascale_a", "params": {"o": 0.1}}]) != base
    # FIT/SCORE-side hyperparameters reuse EMBED's output
    assert key(["gram", {"name": "nac", "params": {"alpha": 5.0, "o_star": "3,4,5"}},
                {"name": "adascale_a", "params": {"lmbda": 1.0, "percentile": "80,85"}}]) == base
