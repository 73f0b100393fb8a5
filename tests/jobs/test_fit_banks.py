"""FIT draws the KNN/NNGuide banks in its Ray tasks (the seeded sample by image id, file by file) and
fits the detectors fitted on rows in Ray tasks on a ``fit_fraction`` of their split: the driver
never loads the train split. The drawn bank equals the library's ``fit`` on every row (with the
image ids), and at fraction 1 today's bank (every ID-train row, in read order); a detector fitted in
a task equals the library's fit on the same rows."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from jobs import storage
from jobs.rows import FIT_SEED
from jobs.shards import commit_shard
from jobs.stages.fit import (
    collect_row_fits,
    fit_from_stats,
    row_groups,
    split_rows,
    submit_row_fits,
    train_files,
    train_stats,
)
from oodlib.detectors import Head, make_detector
from oodlib.detectors.knn import KNN
from oodlib.faiss_index import l2_normalize
from oodlib.sampling import unit_hash

pytestmark = pytest.mark.slow
D, C = 6, 3


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def feature_dirs(tmp_path_factory):
    """Three committed shards of features: ID train/val/test rows and an OOD set, shuffled ids."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("features")
    dirs = []
    for s in range(3):
        n = 300 + 50 * s
        split = rng.choice(["train", "train", "val", "test"], n)
        table = pa.table({
            "image_id": [f"id/{s}/{rng.integers(1e9)}" for _ in range(n)], "split": split,
            "label": pa.array(rng.integers(0, C, n), pa.int32()),
            "features": storage.vector_column(rng.normal(size=(n, D)).astype(np.float32)),
            "gram": rng.normal(size=n).astype(np.float32),
        })
        part = root / f"scratch{s}" / "features"
        for ds in ("imagenet", "ood"):
            storage.write_table(table, part / f"dataset={ds}")
        target = storage.StageDir(root / "tables", f"shard{s}", "shard-")
        commit_shard(target, {"features": part}, {})
        dirs.append(target.path / "features")
    return dirs


def ctx_for(feature_dirs) -> SimpleNamespace:
    cfg = SimpleNamespace(data=SimpleNamespace(id_dataset="imagenet"), runtime=SimpleNamespace(stall_timeout_s=300))
    return SimpleNamespace(cfg=cfg, model=SimpleNamespace(num_classes=C, feature_dim=D))


def id_train(feature_dirs):
    import pyarrow.compute as pc

    t = storage.read_table(feature_dirs, ["image_id", "features", "label"],
                           filter=(pc.field("dataset") == "imagenet") & (pc.field("split") == "train"))
    return t.column("image_id").to_pylist(), storage.vector_to_numpy(t.column("features")), t.column("label").to_numpy()


def test_banks_drawn_in_the_workers_equal_the_library_fit(ray_local, feature_dirs):
    ids, h, y = id_train(feature_dirs)
    samples = ((1.0, 0, 5), (0.1, 0, 5), (0.1, 7, 5), (0.001, 3, 50))  # the last: too few rows below 0.001, topped up
    stats, banks = train_stats(ctx_for(feature_dirs), feature_dirs, {"moments"}, samples)
    assert stats.moments.counts.sum() == len(ids)
    # fraction 1: every ID-train row in read order — today's bank, bit for bit
    np.testing.assert_array_equal(banks[1.0, 0, 5], h)
    np.testing.assert_array_equal(KNN(k=5).fit_bank(banks[1.0, 0, 5]).bank_, np.ascontiguousarray(l2_normalize(h), np.float32))
    for fraction, seed, minimum in samples[1:]:
        library = KNN(k=minimum, alpha=fraction, seed=seed).fit(h, y, None, image_ids=ids)
        drawn = KNN(k=minimum, alpha=fraction, seed=seed).fit_bank(banks[fraction, seed, minimum])
        np.testing.assert_array_equal(drawn.bank_, library.bank_)
        expected = max(minimum, int((unit_hash(ids, seed) < fraction).sum()))
        assert len(drawn.bank_) == expected
    assert len(banks[0.001, 3, 50]) == 50  # the minimum: the 50 rows of smallest u


def test_fit_uses_the_drawn_banks_and_fits_on_rows_in_a_task(ray_local, feature_dirs):
    ids, h, y = id_train(feature_dirs)
    head = Head(np.random.default_rng(1).normal(size=(C, D)).astype(np.float32), np.zeros(C, np.float32))
    dets = {"knn": make_detector("knn", k=3, alpha=0.2), "nnguide": make_detector("nnguide", k=3, alpha=0.2),
            "vim": make_detector("vim", dim=2)}
    samples = tuple(dict.fromkeys(d.bank_sample() for k, d in dets.items() if k != "vim"))
    stats, banks = train_stats(ctx_for(feature_dirs), feature_dirs, {"moments"}, samples)
    groups = row_groups(dets, {"vim": 0.5})
    assert groups == {("train", (), 0.5): ["vim"]}  # the banks come from the partial-sum tasks; only ViM fits on rows
    refs = submit_row_fits(train_files(feature_dirs, "imagenet"), groups, dets, head)
    fit_from_stats({k: d for k, d in dets.items() if k != "vim"}, stats, head, banks)
    collect_row_fits(refs, dets, 60)
    np.testing.assert_array_equal(dets["knn"].bank_, KNN(k=3, alpha=0.2).fit(h, y, head, image_ids=ids).bank_)
    np.testing.assert_array_equal(dets["nnguide"].bank_, make_detector("nnguide", k=3, alpha=0.2).fit(h, y, head, image_ids=ids).bank_)
    half = unit_hash(ids, FIT_SEED) < 0.5
    ref = make_detector("vim", dim=2).fit(h[half], y[half], head)
    got = dets["vim"].state_dict()
    assert got.keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():  # fitted in a task on the same rows: the same state
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-9, err_msg=name)


def test_split_rows_reads_the_fraction_and_its_columns(ray_local, feature_dirs):
    ids, h, _ = id_train(feature_dirs)
    hs, ys, extras = split_rows(train_files(feature_dirs, "imagenet"), "train", ("gram",), 0.3)
    keep = unit_hash(ids, FIT_SEED) < 0.3
    np.testing.assert_array_equal(hs, h[keep])
    assert len(ys) == len(extras["gram"]) == keep.sum()
