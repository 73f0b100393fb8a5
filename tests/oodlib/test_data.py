"""The embedded benchmark, manifest builders and the decode/quarantine path."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from oodlib.data import digits as D
from oodlib.data.longtail import long_tail_counts
from oodlib.data.decode import decode_batch, load_pil, DecodeError
from oodlib.data.manifest import (
    ManifestError, manifest_from_image_folder, manifest_from_image_sets, manifest_from_list_file, read_manifest,
)
from oodlib.data.preprocess import DIGITS_PREPROCESS, IMAGENET_PREPROCESS


def test_digits_sets_shape_and_labels(digits_sets):
    train = digits_sets[("digits", "train")]
    assert set(np.unique(train.labels)) == set(D.ID_CLASSES)
    assert train.images.shape[1:] == (32, 32) and train.images.dtype == np.uint8
    for key in [("digits-near", "test"), ("photo-patches", "test"), ("noise", "test")]:
        assert (digits_sets[key].labels == -1).all()
    c = digits_sets[("digits-c", "test")]
    test = digits_sets[("digits", "test")]
    assert len(c.image_ids) == len(test.image_ids) * len(D.CORRUPTIONS) * len(D.SEVERITIES)
    assert set(c.subsets) == {f"{k}-{s}" for k in D.CORRUPTIONS for s in D.SEVERITIES}
    ids = [i for s in digits_sets.values() for i in s.image_ids]
    assert len(ids) == len(set(ids))


def test_digits_deterministic_and_disjoint_splits(digits_sets):
    again = {(s.dataset, s.split): s for s in D.build_digits(0)}
    for key, s in digits_sets.items():
        np.testing.assert_array_equal(s.images, again[key].images)
        assert s.image_ids == again[key].image_ids
    split_ids = [set(digits_sets[("digits", sp)].image_ids) for sp in ("train", "val", "test")]
    assert not (split_ids[0] & split_ids[1] or split_ids[0] & split_ids[2] or split_ids[1] & split_ids[2])
    other = {(s.dataset, s.split): s for s in D.build_digits(1)}
    assert other[("digits", "train")].image_ids != digits_sets[("digits", "train")].image_ids


def test_long_tail_profile(digits_sets):
    assert long_tail_counts(100, 8, 10) == [int(100 * 10 ** (-k / 7)) for k in range(8)]
    assert long_tail_counts(100, 8, 100)[0] == 100 and long_tail_counts(100, 8, 100)[-1] == 1
    train = digits_sets[("digits", "train")]
    n_max = min(np.bincount(train.labels))
    for rho in (10, 100):
        lt = digits_sets[(f"digits-lt{rho}", "train")]
        np.testing.assert_array_equal(np.bincount(lt.labels, minlength=8), long_tail_counts(n_max, 8, rho))


def test_digits_c_levels_degrade_without_collapsing(digits_sets, digits_inputs, digits_model):
    """Every corruption level costs accuracy, more at higher severity, and no level collapses onto
    one predicted class (where wrong predictions could not be told from correct ones)."""
    from oodlib.errors.mutants import predict

    x, y = digits_inputs[("digits-c", "test")]
    pred = predict(digits_model, x).numpy()
    levels = np.asarray(digits_sets[("digits-c", "test")].subsets)
    clean = float((predict(digits_model, digits_inputs[("digits", "test")][0]).numpy() == digits_inputs[("digits", "test")][1]).mean())
    for kind in D.CORRUPTIONS:
        acc = [float((pred == y)[levels == f"{kind}-{s}"].mean()) for s in D.SEVERITIES]
        assert clean > acc[0] - 0.01 and acc[0] > acc[-1] and 0.5 < acc[-1] < 0.99, (kind, acc)
        for s in D.SEVERITIES:
            top_share = np.bincount(pred[levels == f"{kind}-{s}"]).max() / (levels == f"{kind}-{s}").sum()
            assert top_share < 0.5, (kind, s, top_share)


def test_corruptions_change_images_monotonically():
    rng = np.random.default_rng(0)
    img = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (4, 32, 1))
    for kind in D.CORRUPTIONS:
        diffs = [np.abs(D.corrupt(img, kind, s, np.random.default_rng(0)).astype(float) - img).mean() for s in D.SEVERITIES]
        assert diffs[0] > 0 and diffs[2] >= diffs[0], kind
    with pytest.raises(ValueError, match="unknown corruption"):
        D.corrupt(img, "fog", 1, rng)


def test_manifest_png_round_trip(digits_sets, tmp_path):
    s = digits_sets[("digits", "val")]
    table = manifest_from_image_sets([s])
    pq.write_table(table, tmp_path / "m.parquet")
    back = read_manifest(tmp_path / "m.parquet")
    assert back.column("image_id").to_pylist() == s.image_ids
    x, reasons = decode_batch(back.column("image").to_pylist()[:5], [None] * 5, DIGITS_PREPROCESS)
    assert reasons == [None] * 5
    np.testing.assert_allclose(x[:, 0].numpy(), (s.images[:5] / 255.0 - 0.5) / 0.5, atol=1e-6)


def _write_png(path, size=(10, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def test_image_folder_and_list_file(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(2):
            _write_png(tmp_path / "train" / cls / f"{i}.png")
    t = manifest_from_image_folder(tmp_path / "train", "pets", "train")
    assert t.column("label").to_pylist() == [0, 0, 1, 1]
    assert t.column("image_id").to_pylist()[0] == "pets/train/cat/0.png"
    ood = manifest_from_image_folder(tmp_path / "train", "pets-ood", "test", ood=True)
    assert set(ood.column("label").to_pylist()) == {-1}
    (tmp_path / "list.txt").write_text("# comment\ncat/0.png 3\n\ndog/1.png\n")
    lt = manifest_from_list_file(tmp_path / "list.txt", tmp_path / "train", "x", "val")
    assert lt.column("label").to_pylist() == [3, -1]
    with pytest.raises(ManifestError, match="does not exist"):
        manifest_from_image_folder(tmp_path / "nope", "a", "train")


def test_manifest_validation_names_problem(tmp_path):
    bad = pa.table({"image_id": ["a", "a"], "dataset": ["d", "d"], "split": ["test", "test"], "label": [0, 1], "path": ["x", "y"]})
    pq.write_table(bad, tmp_path / "dup.parquet")
    with pytest.raises(ManifestError, match="duplicate image_id 'a'"):
        read_manifest(tmp_path / "dup.parquet")
    pq.write_table(bad.drop_columns(["path"]), tmp_path / "noimg.parquet")
    with pytest.raises(ManifestError, match="'path' or an 'image'"):
        read_manifest(tmp_path / "noimg.parquet")
    pq.write_table(bad.set_column(2, "split", pa.array(["test", "holdout"])).set_column(0, "image_id", pa.array(["a", "b"])), tmp_path / "split.parquet")
    with pytest.raises(ManifestError, match="holdout"):
        read_manifest(tmp_path / "split.parquet")


def _bytes(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_converts_modes_and_quarantines_bad_bytes(tmp_path):
    good = _bytes(Image.new("RGB", (40, 30), (10, 20, 30)))
    rgba = _bytes(Image.new("RGBA", (8, 8), (255, 0, 0, 128)))
    palette = _bytes(Image.new("P", (8, 8), 3))
    grey16 = _bytes(Image.fromarray(np.full((8, 8), 40000, np.uint16)))
    cmyk = _bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG")
    truncated = good[: len(good) // 2]
    data = [good, rgba, palette, grey16, cmyk, truncated, b"", b"not an image at all", None]
    paths = [None] * 8 + [str(tmp_path / "missing.png")]
    x, reasons = decode_batch(data, paths, DIGITS_PREPROCESS)
    assert reasons[:5] == [None] * 5
    assert x.shape == (5, 1, 32, 32)
    assert "undecodable" in reasons[5]
    assert reasons[6] == "zero-length image bytes"
    assert "undecodable" in reasons[7]
    assert "cannot read" in reasons[8] and "missing.png" in reasons[8]
    # 16-bit 40000/65535 → grey 155 → normalized
    assert x[3, 0, 0, 0].item() == pytest.approx((round(40000 / 65535 * 255 - 0.5) / 255 - 0.5) / 0.5, abs=0.01)


def test_decompression_bomb_refused():
    bomb = _bytes(Image.new("1", (20000, 20000)))  # 400 Mpx, a few KB as PNG
    with pytest.raises(DecodeError, match="decompression bomb"):
        load_pil(bomb, None)


def test_oversized_file_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:  # a sparse 1 GiB file, refused from its size (the message says so)
        fh.truncate(2**30)
    x, reasons = decode_batch([None, _bytes(Image.new("L", (8, 8)))], [str(big), None], IMAGENET_PREPROCESS, max_bytes=1000)
    assert len(x) == 1 and reasons[1] is None
    assert reasons[0] == f"file of {2**30} bytes is over the 1000-byte cap (data.max_image_bytes)"
    with pytest.raises(DecodeError, match="over the 10-byte cap"):
        load_pil(b"x" * 11, None, max_bytes=10)


def test_imagenet_resize_and_center_crop():
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, 200:] = 255  # right half white
    x, reasons = decode_batch([_bytes(Image.fromarray(arr))], [None], IMAGENET_PREPROCESS)
    assert reasons == [None] and x.shape == (1, 3, 224, 224)
    # resize shorter side to 256 → 341×256, crop 224 centred: the white edge sits at column ~112
    row = x[0, 0, 100].numpy()
    assert row[:100].max() < 0 and row[130:].min() > 0


def test_spread_sample_covers_every_class_and_spreads():
    """Periodic class order (the digits' own): evenly spaced rows of the whole set alias and miss a
    class; spread_sample shares the limit over the classes and spaces each class's rows."""
    from oodlib.data.manifest import spread_sample

    labels = np.tile(np.arange(8), 108)  # 864 rows, period 8; stride 864/20 ≈ 43 would alias
    idx = spread_sample(labels, 20)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    assert sorted(np.bincount(labels[idx], minlength=8).tolist()) == [2] * 4 + [3] * 4
    rows0 = np.flatnonzero(labels == 0)  # class 0 (first seen) gets 3 rows, evenly spaced: 0, 36, 72 of 108
    assert idx[labels[idx] == 0].tolist() == rows0[[0, 36, 72]].tolist()
    # a class smaller than its share gives the rest to the others; limit ≥ N keeps everything
    small = np.array([0] * 10 + [1] * 2 + [2] * 10)
    assert np.bincount(small[spread_sample(small, 12)]).tolist() == [5, 2, 5]
    assert spread_sample(small, 100).tolist() == list(range(22))
    # one class (an OOD set, label −1): evenly spaced in order
    assert spread_sample(np.full(10, -1), 5).tolist() == [0, 2, 4, 6, 8]


def test_spread_sample_keeps_every_level():
    """A level-major set (digits-c: 12 corruption levels × 8 classes × 5 images): 24 rows are 2
    per level, and inside a level the two rows are of different classes."""
    from oodlib.data.manifest import spread_sample

    levels = np.repeat(np.arange(12), 40)
    labels = np.tile(np.repeat(np.arange(8), 5), 12)
    idx = spread_sample(labels, 24, levels)
    assert np.bincount(levels[idx], minlength=12).tolist() == [2] * 12
    assert all(len(set(labels[idx][levels[idx] == lv])) == 2 for lv in range(12))
    assert len(set(map(tuple, np.c_[levels[idx], labels[idx]]))) == 24
