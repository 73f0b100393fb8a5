"""Localization ground truth, explanation metrics, image selection, PNG grid, sanity check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from oodlib.attribution import AE_ABLATION, explain
from oodlib.attribution.localization import (
    evaluate_maps,
    gaussian_blur,
    lerf_deletion,
    localization_table,
    morf_insertion,
    outside_inside_ratio,
    pointing_game,
    positive_ratio,
    segmentation,
)
from oodlib.attribution.selection import select_images
from oodlib.data.localization import build_localization
from oodlib.reporting.attribution import render_grid


@pytest.fixture(scope="module")
def loc():
    return build_localization(seed=0, n=48)


def test_localization_set_deterministic_and_consistent(loc):
    again = build_localization(seed=0, n=48)
    assert np.array_equal(loc.images, again.images) and np.array_equal(loc.masks, again.masks)
    assert not np.array_equal(loc.images, build_localization(seed=1, n=48).images)
    assert loc.images.shape == loc.masks.shape == (48, 32, 32)
    # every mask pixel lies in its box, the box is tight, and masked pixels are the bright strokes
    assert not (loc.masks & ~loc.box_masks()).any()
    for m, (y0, x0, y1, x1) in zip(loc.masks, loc.boxes):
        assert m[y0].any() and m[y1 - 1].any() and m[:, x0].any() and m[:, x1 - 1].any()
    assert loc.images[loc.masks].min() > 64 >= 0.15 * 255 + 1


def test_digits_model_classifies_localization_set(digits_model):
    data = build_localization(seed=0, n=200)
    with torch.no_grad():
        acc = (digits_model(torch.from_numpy(data.inputs())).argmax(1).numpy() == data.labels).mean()
    assert acc >= 0.8


def test_pointing_game_hand_case():
    maps = np.zeros((3, 5, 5))
    maps[0, 1, 1] = maps[1, 4, 4] = maps[2, 0, 0] = 1.0
    masks = np.zeros((3, 5, 5), bool)
    masks[0, 1, 1] = masks[1, 1, 1] = True  # image 2: empty mask → skipped
    r = pointing_game(maps, masks)
    assert (r["hits"], r["misses"], r["skipped"], r["accuracy"]) == (1, 1, 1, 0.5)
    # (4,4) is √18 ≈ 4.24 px from (1,1): a hit with tolerance 5, a miss with 4
    assert pointing_game(maps, masks, tolerance=5)["hits"] == 2
    assert pointing_game(maps, masks, tolerance=4)["hits"] == 1


def test_ratios_hand_case():
    maps = np.array([[[2.0, -1.0], [0.0, 4.0]]])
    inside = np.array([[[True, False], [False, True]]])
    assert positive_ratio(maps)[0] == 0.5
    # inside: R⁺ mean (2+4)/2 = 3, R⁻ mean 0; outside: R⁺ mean 0, |R⁻| mean 0.5
    assert outside_inside_ratio(maps, inside, "signed")[0] == pytest.approx((0 + 0) / (3 + 0.5))
    assert outside_inside_ratio(maps, inside, "pos")[0] == pytest.approx(0.0)
    # normalized: (R+1)/5 → inside (0.6, 1.0) mean 0.8, outside (0, 0.2) mean 0.1
    assert outside_inside_ratio(maps, inside, "normalized")[0] == pytest.approx(0.1 / 0.8)


def test_segmentation_hand_case():
    maps = np.array([[[3.0, 1.0], [-1.0, 0.0]]])
    gt = np.array([[[True, True], [False, False]]])
    # ALL: pred = R > 0 = gt → accuracy 1, mIoU 1
    all_ = segmentation(maps, gt, "all")
    assert all_["pixel_accuracy"][0] == 1.0 and all_["miou"][0] == 1.0
    # POS: R⁺ = (3,1,0,0), mean 1 → pred only (0,0): accuracy 3/4; IoU fg 1/2, bg 2/3
    pos = segmentation(maps, gt, "pos")
    assert pos["pixel_accuracy"][0] == 0.75 and pos["miou"][0] == pytest.approx((0.5 + 2 / 3) / 2)


def test_perturbation_curves(digits_model, loc):
    x = torch.from_numpy(loc.inputs()[:8])
    t = torch.from_numpy(loc.labels[:8])
    maps = torch.randn(8, 32, 32)
    ins = morf_insertion(digits_model, x, maps, t, fractions=[0.0, 1.0])
    with torch.no_grad():
        p_full = torch.softmax(digits_model(x), 1)[torch.arange(8), t].mean().item()
        p_blur = torch.softmax(digits_model(gaussian_blur(x, 2.0)), 1)[torch.arange(8), t].mean().item()
    assert ins["probability"][0] == pytest.approx(p_blur, rel=1e-5)
    assert ins["probability"][1] == pytest.approx(p_full, rel=1e-5)
    dele = lerf_deletion(digits_model, x, maps, t, steps=2, pixels_per_step=512)
    assert dele["pixels"].tolist() == [0, 512, 1024] and dele["probability"][0] == pytest.approx(p_full, rel=1e-5)
    with torch.no_grad():
        p_zero = torch.softmax(digits_model(torch.zeros_like(x)), 1)[torch.arange(8), t].mean().item()
    assert dele["probability"][2] == pytest.approx(p_zero, rel=1e-5)


def test_table_and_methods_on_localization_set(digits_model, loc):
    x = torch.from_numpy(loc.inputs()[:16])
    masks = loc.masks[:16]
    maps = {m: explain(digits_model, x, m)[0].numpy() for m in ("rap", "lrp-a1b0", "gradcam")}
    maps.update({f"ae[{k}]": explain(digits_model, x, "ae", gamma=2.0, terms=v)[0].numpy() for k, v in AE_ABLATION.items()})
    t = digits_model(x).argmax(1)
    table = localization_table(maps, masks, loc.box_masks()[:16], morf={"model": digits_model, "x": x, "target": t})
    assert list(table.index) == list(maps)
    assert {"pointing_game", "positive_ratio", "oi_signed", "oi_pos", "oi_normalized", "miou_pos", "miou_all",
            "pixel_acc_pos", "pixel_acc_all", "morf_acc_area"} <= set(table.columns)
    assert table.loc["rap", "pointing_game"] == evaluate_maps(maps["rap"], masks, loc.box_masks()[:16])["pointing_game"]
    assert ((table["positive_ratio"] >= 0) & (table["positive_ratio"] <= 1)).all()


def test_sanity_check_cascading_randomization(digits_model, loc):
    """Randomizing layers from the head down changes RAP maps more and more: |rank correlation| with
    the original map falls (the sign of the whole map may flip when the head is randomized)."""
    import copy

    x = torch.from_numpy(loc.inputs()[:8])
    base, _, t = explain(digits_model, x, "rap")
    model = copy.deepcopy(digits_model)
    torch.manual_seed(0)
    corrs = []
    for module in (model.head, model.backbone[2][0], model.backbone[1][0], model.backbone[0][0]):
        with torch.no_grad():
            module.weight.normal_(0, module.weight.std().item())
        maps, _, _ = explain(model, x, "rap", target=t)
        corrs.append(abs(np.mean([spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(base.numpy(), maps.numpy())])))
    assert corrs[-1] < corrs[0] and corrs[-1] < 0.5 and all(c < 0.99 for c in corrs)


def test_select_images():
    ids = np.array([f"i{k}" for k in range(8)])
    pred = np.array([0, 1, 1, 0, 2, 2, 0, 0])
    label = np.array([0, 0, 1, 1, -1, -1, 0, -1])
    conf = np.array([0.9, 0.8, 0.3, 0.6, 0.5, 0.95, 0.1, 0.2])
    df = select_images(ids, pred, label, conf, counts={"wrong": 1, "uncertain": 2, "risky_ood": 1, "random": 1})
    got = list(zip(df.image_id, df.reason))
    # wrong: i1 (0.8) before i3 (0.6); uncertain: lowest ID confidence not already taken: i6, i2;
    # risky OOD: highest ID-confidence among OOD: i5
    assert got[:4] == [("i1", "wrong"), ("i6", "uncertain"), ("i2", "uncertain"), ("i5", "risky_ood")]
    assert len(df) == 5 and df.image_id.is_unique


def test_render_grid(tmp_path, loc):
    maps = {"a": np.random.default_rng(0).normal(size=(2, 32, 32)), "b": np.zeros((2, 32, 32))}
    path = render_grid(loc.images[:2], maps, tmp_path / "grid.png", titles=["x", "y"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# --- ground truth on disk: segmentation masks and VOC boxes --------------------------------------


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_masks_follow_the_images_resize_and_center_crop(tmp_path):
    """A 400×300 RGB image, top half red, bottom half blue, its mask = the bottom half. ImageNet's
    geometry: shorter side 300 → 256 (341×256), center crop 224 from row 16, column 58, so the
    mask is rows ≥ 112 of the crop (up to nearest-neighbour rounding at the border); the inputs
    equal the decode path's, pixel for pixel."""
    from oodlib.data.decode import decode_batch
    from oodlib.data.localization import localization_from_files
    from oodlib.data.preprocess import IMAGENET_PREPROCESS

    img = np.zeros((300, 400, 3), np.uint8)
    img[:150, :, 0], img[150:, :, 2] = 200, 180
    _png(tmp_path / "a.png", img)
    (tmp_path / "masks").mkdir()
    _png(tmp_path / "masks" / "a.png", (np.arange(300)[:, None] >= 150).repeat(400, 1).astype(np.uint8))
    (tmp_path / "list.txt").write_text("# path label\na.png 7\n")
    loc = localization_from_files(tmp_path / "list.txt", IMAGENET_PREPROCESS, masks_dir=tmp_path / "masks")
    assert loc.images.shape == (1, 224, 224, 3) and loc.masks.shape == (1, 224, 224) and loc.labels.tolist() == [7]
    rows = loc.masks[0].all(1)
    assert rows[113:].all() and not loc.masks[0][:111].any()
    assert loc.boxes[0].tolist()[1:] == [0, 224, 224] and loc.boxes[0][0] in (111, 112, 113)
    assert tuple(loc.images[0, 50, 100]) == (200, 0, 0) and tuple(loc.images[0, 200, 100]) == (0, 0, 180)
    x, _ = decode_batch([None], [str(tmp_path / "a.png")], IMAGENET_PREPROCESS)
    assert np.array_equal(loc.inputs(), x.numpy())


def test_voc_boxes_pick_the_named_objects(tmp_path):
    """VOC boxes are 1-based and inclusive: xmin 11 … xmax 30 are columns 10–29. With an object
    name, only that class's boxes form the mask; without, the union of all boxes."""
    from oodlib.data.localization import localization_from_files, voc_boxes
    from oodlib.data.preprocess import Preprocess

    pre = Preprocess(mode="RGB", size=(64, 64), mean=(0.0,) * 3, std=(1.0,) * 3)  # no resize, no crop
    _png(tmp_path / "b.jpg.png", np.full((64, 64, 3), 90, np.uint8))
    (tmp_path / "ann").mkdir()
    obj = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
    (tmp_path / "ann" / "b.jpg.xml").write_text(
        "<annotation><filename>b.jpg</filename>" + obj.format("dog", 11, 21, 30, 40) + obj.format("cat", 50, 1, 64, 5)
        + "</annotation>")
    assert voc_boxes(tmp_path / "ann" / "b.jpg.xml") == [(20, 10, 40, 30), (0, 49, 5, 64)]
    (tmp_path / "list.txt").write_text("b.jpg.png, 12, dog\n")
    loc = localization_from_files(tmp_path / "list.txt", pre, voc_dir=tmp_path / "ann")
    expected = np.zeros((64, 64), bool)
    expected[20:40, 10:30] = True
    assert np.array_equal(loc.masks[0], expected) and loc.boxes[0].tolist() == [20, 10, 40, 30]
    assert np.allclose(loc.inputs(), 90 / 255) and loc.labels.tolist() == [12]
    (tmp_path / "all.txt").write_text("b.jpg.png 12\n")
    both = localization_from_files(tmp_path / "all.txt", pre, voc_dir=tmp_path / "ann")
    assert both.masks[0].sum() == 20 * 20 + 5 * 15


def test_ground_truth_errors_name_the_file(tmp_path):
    from oodlib.data.localization import localization_from_files, read_localization_list, voc_boxes
    from oodlib.data.preprocess import IMAGENET_PREPROCESS

    (tmp_path / "masks").mkdir()
    (tmp_path / "bad.txt").write_text("a.png\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'path label \[object_name\]'"):
        read_localization_list(tmp_path / "bad.txt")
    _png(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "list.txt").write_text("a.png 1\n")
    with pytest.raises(ValueError, match=r"a.png: no mask .*masks/a.png"):
        localization_from_files(tmp_path / "list.txt", IMAGENET_PREPROCESS, masks_dir=tmp_path / "masks")
    corner = np.zeros((40, 80), np.uint8)
    corner[:, :5] = 1  # the object lies outside the center crop
    _png(tmp_path / "a.png", np.zeros((40, 80, 3), np.uint8))
    _png(tmp_path / "masks" / "a.png", corner)
    with pytest.raises(ValueError, match="a.png: the object mask is empty in the model's input crop"):
        localization_from_files(tmp_path / "list.txt", IMAGENET_PREPROCESS, masks_dir=tmp_path / "masks")
    (tmp_path / "x.xml").write_text("<annotation><object><name>dog</name></object></annotation>")
    with pytest.raises(ValueError, match="x.xml: not a PASCAL VOC annotation"):
        voc_boxes(tmp_path / "x.xml")
    with pytest.raises(ValueError, match="exactly one of masks_dir and voc_dir"):
        localization_from_files(tmp_path / "list.txt", IMAGENET_PREPROCESS)


def test_localization_benchmark_on_files_equals_embedded(tmp_path, digits_model):
    """The embedded set written to disk (PNG images, PNG stroke masks, a list file) and read back
    as user ground truth gives the same localization table as the embedded path."""
    from oodlib.attribution.maps import localization_benchmark

    n, methods = 12, ["rap", "gradient"]
    loc = build_localization(seed=0, n=n)
    (tmp_path / "masks").mkdir()
    lines = []
    for i, (im, m, y) in enumerate(zip(loc.images, loc.masks, loc.labels)):
        _png(tmp_path / f"im{i:02d}.png", im)
        _png(tmp_path / "masks" / f"im{i:02d}.png", m.astype(np.uint8))
        lines.append(f"im{i:02d}.png {y}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    data = {"list_file": str(tmp_path / "list.txt"), "masks_dir": str(tmp_path / "masks"), "voc_dir": None, "tolerance": 0}
    embedded = localization_benchmark(digits_model, n, methods, torch.device("cpu"))
    on_disk = localization_benchmark(digits_model, n, methods, torch.device("cpu"), data)
    for k in ("table", "lerf"):
        a, b = embedded[k], on_disk[k]
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
        assert np.allclose(a.select_dtypes("number").to_numpy(), b.select_dtypes("number").to_numpy(), rtol=1e-5, atol=1e-6)
    assert embedded["table"].method.tolist() == methods and 0.5 < float(embedded["table"]["accuracy"].iloc[0]) <= 1.0
