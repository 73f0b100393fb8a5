"""Row selection per EMBED extra (:mod:`jobs.rows`): which rows each extra is computed on, that the
rows which do not need an extra get no work for it (counted), the missing-value convention (null
scalars, all-NaN vectors) and SCORE's null score for a row without the column it reads, and that
the selection keys EMBED."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

import oodlib.detectors as D
import oodlib.layers as L
from jobs.config import parse_config
from jobs.embed_pass import embed_batch
from jobs.extras import ExtraSpec, build_extras, extra_rows, wanted_extras
from jobs.rows import FIT_SEED, RowNeeds, extra_rows_column
from jobs.stages.embed import EmbedStage
from jobs.stages.score import score_batch
from jobs.storage import column_numpy
from oodlib.data.manifest import encode_png
from oodlib.sampling import id_sample, unit_hash

DETECTORS = ["msp", "odin", {"name": "gram", "params": {"powers": "1,2"}, "fit_fraction": 0.5}, "multi_mahalanobis"]


def config(detectors=DETECTORS, **errors):
    return parse_config({"experiment": "x", "detectors": detectors, "data": {"extra_datasets": ["digits-c"]},
                         "errors": {"enabled": bool(errors), **errors}})


def manifest(digits_sets, per_set: int = 12) -> pa.Table:
    """``per_set`` rows of the ID splits, an OOD set and an extra set (the images of ID test)."""
    s = digits_sets[("digits", "test")]
    parts = [("digits", "train"), ("digits", "val"), ("digits", "test"), ("noise", "test"), ("digits-c", "test"), ("digits-lt100", "train")]
    cols = {k: [] for k in ("image_id", "dataset", "split", "label", "image")}
    for d, sp in parts:
        for i in range(per_set):
            cols["image_id"].append(f"{d}/{sp}/{i}")
            cols["dataset"].append(d)
            cols["split"].append(sp)
            cols["label"].append(int(s.labels[i]) if d != "noise" else -1)
            cols["image"].append(encode_png(s.images[(i * 7 + len(cols["image"])) % len(s.images)]))
    n = len(cols["image_id"])
    return pa.table({**{k: v for k, v in cols.items() if k != "image"}, "label": pa.array(cols["label"], pa.int64()),
                     "subset": [None] * n, "batch": [None] * n, "image": pa.array(cols["image"], pa.binary()), "path": [None] * n})


def test_rows_each_extra_needs():
    cfg = config(fit_fraction=0.25)
    needs = extra_rows(cfg)
    assert set(needs) == {"odin", "conductance", "lcr", "gram", "layer_means"}
    # ODIN: the rows SCORE evaluates it on — never the ID train split
    assert needs["odin"].fraction_of("digits", "train") == 0
    for d, sp in [("digits", "val"), ("digits", "test"), ("digits-near", "test"), ("digits-c", "test")]:
        assert needs["odin"].fraction_of(d, sp) == 1
    # a detector fitted on its EMBED column: plus its fit split, a fraction of it; the other one all of it
    assert needs["gram"].fraction_of("digits", "train") == 0.5
    assert needs["layer_means"].fraction_of("digits", "train") == 1
    # conductance/LCR: the ERRORS rows, errors.fit_fraction of ID train; the graph's sets are nobody's
    assert needs["conductance"].fraction_of("digits", "train") == needs["lcr"].fraction_of("digits", "train") == 0.25
    assert needs["conductance"].fraction_of("noise", "test") == 0  # not a new-class set here
    assert all(n.fraction_of("digits-lt100", "train") == 0 for n in needs.values())


def test_fraction_rows_are_a_seeded_sample_by_image_id():
    ids = [f"img-{i}" for i in range(4000)]
    rows = pa.table({"image_id": ids, "dataset": ["d"] * 4000, "split": ["train"] * 4000})
    half = RowNeeds.of(["d"], "train", 0.5).mask(rows)
    assert 1800 < half.sum() < 2200
    np.testing.assert_array_equal(half, unit_hash(ids, FIT_SEED) < 0.5)
    # by id, whatever the order; nested fractions
    perm = np.random.default_rng(0).permutation(4000)
    np.testing.assert_array_equal(RowNeeds.of(["d"], "train", 0.5).mask(rows.take(pa.array(perm))), half[perm])
    tenth = RowNeeds.of(["d"], "train", 0.1).mask(rows)
    assert not (tenth & ~half).any()
    np.testing.assert_array_equal(id_sample(ids, 0.1, FIT_SEED), tenth)


def test_scored_rows_as_a_split_filter():
    """SCORE's rows (jobs.rows.scored_rows) as {dataset: splits or None}, and the filter keeps exactly them."""
    from jobs import storage
    from jobs.rows import scored_rows

    wanted = scored_rows(config()).splits()
    assert wanted == {"digits": ("test", "val"), "digits-c": None, "digits-near": None, "noise": None, "photo-patches": None}
    assert (RowNeeds.of(["a"], "val") | RowNeeds.of(["a"]) | RowNeeds.of(["b"], "test")).splits() == {"a": None, "b": ("test",)}
    rows = pa.table({"dataset": ["digits", "digits", "digits", "noise", "digits-lt100"], "split": ["train", "val", "test", "test", "train"]})
    assert rows.filter(storage.rows_filter(wanted)).to_pydict() == {"dataset": ["digits", "digits", "noise"], "split": ["val", "test", "test"]}
    with pytest.raises(ValueError, match="fraction below 1"):
        RowNeeds.of(["a"], "train", 0.5).splits()


@pytest.fixture
def counted(monkeypatch):
    """Rows each ODIN and layer-pass call gets (both are reached through their modules)."""
    calls = {"odin": [], "layer_pass": []}
    odin, layer_pass = D.odin_score, L.layer_pass
    monkeypatch.setattr(D, "odin_score", lambda model, x, *a, **k: calls["odin"].append(len(x)) or odin(model, x, *a, **k))
    monkeypatch.setattr(L, "layer_pass", lambda model, x, r: calls["layer_pass"].append((len(x), len(r))) or layer_pass(model, x, r))
    return calls


def test_rows_that_do_not_need_an_extra_get_no_work(digits_model, digits_sets, counted):
    cfg = config()
    needs = extra_rows(cfg)
    rows = manifest(digits_sets)
    bits = extra_rows_column(rows, needs)
    batch = rows.append_column("shard", pa.array([0] * rows.num_rows)).append_column("extra_rows", pa.array(bits))
    extras = build_extras(tuple(ExtraSpec(n, p) for n, p in wanted_extras(cfg).items()), digits_model, torch.device("cpu"))
    forwards = []  # rows of every pass through the backbone
    hook = digits_model.backbone.register_forward_hook(lambda _m, inputs, _o: forwards.append(len(inputs[0])))
    try:
        out = embed_batch(digits_model, batch, torch.device("cpu"), extras)
    finally:
        hook.remove()
    assert out.column("quarantine_reason").null_count == rows.num_rows
    want = {n: needs[n].mask(rows) for n in needs}
    # ODIN: one call, on exactly its rows (ID val/test, OOD, extra: 4 × 12), none of the ID train rows
    assert counted["odin"] == [int(want["odin"].sum())] == [48]
    # the shared layer pass: gram (val/test/OOD/extra + half of train) and layer_means (+ all of train)
    # overlap, so one pass computes both on the common rows and one only layer_means on the rest
    gram_only, means_only = want["gram"] & ~want["layer_means"], want["layer_means"] & ~want["gram"]
    assert not gram_only.any() and means_only.sum() == 12 - want["gram"][:12].sum() > 0
    assert sorted(counted["layer_pass"]) == sorted([(int(want["gram"].sum()), 2), (int(means_only.sum()), 1)])
    assert sum(n for n, _ in counted["layer_pass"]) == int((want["gram"] | want["layer_means"]).sum())
    assert not (want["gram"] | want["layer_means"] | want["odin"])[60:].any()  # the graph's set: no extra at all
    # backbone passes: every row exactly once for its features (the layer passes give those of their
    # rows, one plain forward the rest: the 12 rows no extra needs), plus ODIN's two forwards on its 48
    # rows — no other work on a row that needs no extra
    covered = int((want["gram"] | want["layer_means"]).sum())
    assert sorted(forwards) == sorted([int(want["gram"].sum()), int(means_only.sum()), rows.num_rows - covered, 48, 48])
    assert sum(forwards) == rows.num_rows + 2 * 48

    # missing values: null scalars, all-NaN vectors; the computed ones equal an unselected pass's
    odin = column_numpy(out.column("odin"))
    gram = column_numpy(out.column("gram"))
    assert out.column("odin").null_count == int((~want["odin"]).sum())
    assert np.isnan(odin[~want["odin"]]).all() and np.isfinite(odin[want["odin"]]).all()
    assert np.isnan(gram[~want["gram"]]).all() and np.isfinite(gram[want["gram"]]).all()
    full = embed_batch(digits_model, batch.drop_columns(["extra_rows"]), torch.device("cpu"), extras)
    for c in ("odin", "gram", "layer_means"):
        sel = want["gram" if c == "gram" else "layer_means" if c == "layer_means" else "odin"]
        np.testing.assert_allclose(column_numpy(out.column(c))[sel], column_numpy(full.column(c))[sel], rtol=1e-4, atol=1e-5, err_msg=c)
    for c in ("features", "logits", "pred"):  # every row's features, whichever pass gave them
        np.testing.assert_allclose(column_numpy(out.column(c)), column_numpy(full.column(c)), rtol=1e-4, atol=1e-5)

    # SCORE: a detector reading a missing column gets a null score on that row, the others a value
    from oodlib.detectors import make_detector

    scored = score_batch(out, {"msp": make_detector("msp"), "odin": make_detector("odin")})
    assert scored.column("score_msp").null_count == 0
    assert np.array_equal(scored.column("score_odin").is_null().to_numpy(zero_copy_only=False), ~want["odin"])
    np.testing.assert_allclose(column_numpy(scored.column("score_odin"))[want["odin"]], odin[want["odin"]], rtol=1e-6)


def test_embed_key_includes_the_row_selection(digits_model, digits_sets):
    rows = manifest(digits_sets, 4)

    def key(**kw):
        ctx = SimpleNamespace(cfg=config(**kw), model_hash="m", model=digits_model)
        return EmbedStage().key(ctx, {"manifest": SimpleNamespace(rows=rows)})

    base = key()
    assert key() == base
    assert key(detectors=["msp", "odin", {"name": "gram", "params": {"powers": "1,2"}, "fit_fraction": 0.25}, "multi_mahalanobis"]) != base
    assert key(detectors=["msp", "odin", {"name": "gram", "params": {"powers": "1,2"}}, "multi_mahalanobis"]) != base
