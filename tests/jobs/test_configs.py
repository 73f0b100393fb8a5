"""Shipped configs validate; image sets on disk (ImageFolder, CIFAR binary) become manifests."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jobs.stages.base import rows_hash
from jobs.stages.manifest import folders_table
from jobs.config import parse_config
from oodlib.data.decode import decode_batch
from oodlib.data.manifest import ManifestError, manifest_from_cifar_binary
from oodlib.data.preprocess import CIFAR_PREPROCESS

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path, tmp_path):
    text = path.read_text().replace("/data/", f"{tmp_path}/data/")
    raw = yaml.safe_load(text)
    for s in raw.get("data", {}).get("sets", []):  # create the placeholder roots (and list files)
        Path(s["root"]).mkdir(parents=True, exist_ok=True)
        if s.get("list_file"):
            Path(s["list_file"]).parent.mkdir(parents=True, exist_ok=True)
            Path(s["list_file"]).touch()
    truth = raw.get("explain", {}).get("localization_data")
    if truth:  # placeholder ground truth: the list file and the masks / annotations folder
        Path(truth["list_file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(truth["list_file"]).touch()
        Path(truth.get("masks_dir") or truth["voc_dir"]).mkdir(parents=True, exist_ok=True)
    weights = raw.get("model", {}).get("weights")
    if weights and "/" in weights:
        Path(weights).parent.mkdir(parents=True, exist_ok=True)
        Path(weights).touch()
    cfg = parse_config(raw, source=path.name)
    assert cfg.experiment and cfg.detectors
    if "line" in path.name:
        keys = {d.key for d in cfg.detectors}
        assert {"line", "line_no_wp", "line_no_ap", "energy_ac"} <= keys


def _cifar_records(labels, n_label_bytes=1):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    head = np.array([[0] * (n_label_bytes - 1) + [lab] for lab in labels], np.uint8)
    return np.concatenate([head, pixels], 1), pixels


def test_cifar_binary_manifest(tmp_path):
    records, pixels = _cifar_records([3, 7])
    (tmp_path / "test_batch.bin").write_bytes(records.tobytes())
    table = manifest_from_cifar_binary([tmp_path / "test_batch.bin"], "cifar10", "test")
    assert table.column("label").to_pylist() == [3, 7]
    assert table.column("image_id").to_pylist() == ["cifar10/test/test_batch-00000", "cifar10/test/test_batch-00001"]
    x, reasons = decode_batch(table.column("image").to_pylist(), [None, None], CIFAR_PREPROCESS)
    rgb = pixels.reshape(2, 3, 32, 32).astype(np.float32) / 255.0
    mean = np.asarray(CIFAR_PREPROCESS.mean)[None, :, None, None]
    std = np.asarray(CIFAR_PREPROCESS.std)[None, :, None, None]
    np.testing.assert_allclose(x.numpy(), (rgb - mean) / std, atol=1e-5)
    records100, _ = _cifar_records([55], n_label_bytes=2)
    (tmp_path / "test.bin").write_bytes(records100.tobytes())
    assert manifest_from_cifar_binary([tmp_path / "test.bin"], "c100", "test", 100).column("label").to_pylist() == [55]
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ManifestError, match="record size"):
        manifest_from_cifar_binary([tmp_path / "bad.bin"], "c", "test")


def test_folders_manifest_from_config(tmp_path):
    for cls in ("a", "b"):
        for i in range(2):
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "ood").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ood" / "x.png")
    records, _ = _cifar_records([1, 0, 1])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "test_batch.bin").write_bytes(records.tobytes())
    cfg = parse_config({
        "experiment": "f", "output": str(tmp_path / "out"),
        "data": {"source": "folders", "id_dataset": "pets", "ood_datasets": ["junk"], "sets": [
            {"dataset": "pets", "split": "train", "root": str(tmp_path / "train")},
            {"dataset": "pets", "split": "test", "kind": "cifar10-binary", "root": str(tmp_path / "bin")},
            {"dataset": "junk", "split": "test", "root": str(tmp_path / "ood"), "ood": True},
        ]},
        "model": {"name": "resnet18", "num_classes": 2},
    })
    table = folders_table(cfg)
    key = rows_hash(table)
    assert table.num_rows == 4 + 3 + 1
    assert sorted(set(table.column("dataset").to_pylist())) == ["junk", "pets"]
    assert rows_hash(folders_table(cfg)) == key  # same listing, same manifest
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "ood" / "y.png")
    assert rows_hash(folders_table(cfg)) != key  # a new image changes the manifest key


def test_missing_root_named(tmp_path):
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.sets.0: .*does not exist \(dataset 'x'\)"):
        parse_config({"experiment": "e", "data": {"source": "folders", "sets": [{"dataset": "x", "split": "test", "root": str(tmp_path / "nope")}]}})


def test_localization_ground_truth_validated(tmp_path):
    """explain.localization_data: files must exist, exactly one of masks/VOC; a non-digits model
    cannot use the embedded digits localization set."""
    from jobs.config import ConfigError

    base = {"experiment": "e", "explain": {"enabled": True, "localization": True}}
    with pytest.raises(ConfigError, match=r"explain.localization_data: the embedded localization set is for digits-cnn"):
        parse_config({**base, "model": {"name": "resnet18"}})
    (tmp_path / "list.txt").write_text("a.png 1\n")
    (tmp_path / "masks").mkdir()
    truth = {"list_file": str(tmp_path / "list.txt")}
    with pytest.raises(ConfigError, match="explain.localization_data: .*exactly one of masks_dir"):
        parse_config({**base, "explain": {**base["explain"], "localization_data": truth}})
    with pytest.raises(ConfigError, match=r"explain.localization_data: .*voc_dir .*nope is not a directory"):
        parse_config({**base, "explain": {**base["explain"], "localization_data": {**truth, "voc_dir": str(tmp_path / "nope")}}})
    with pytest.raises(ConfigError, match=r"explain.localization_data: .*list_file .*missing.txt does not exist"):
        parse_config({**base, "explain": {**base["explain"], "localization_data": {"list_file": str(tmp_path / "missing.txt"), "masks_dir": str(tmp_path / "masks")}}})
    cfg = parse_config({**base, "model": {"name": "resnet18"},
                        "explain": {**base["explain"], "localization_data": {**truth, "masks_dir": str(tmp_path / "masks")}}})
    assert cfg.explain.localization_data.masks_dir == tmp_path / "masks" and cfg.explain.localization_data.tolerance == 0


def test_ood_groups_validated():
    from jobs.config import ConfigError

    base = {"experiment": "g", "data": {"ood_datasets": ["digits-near", "photo-patches", "noise"]}}
    cfg = parse_config({**base, "data": {**base["data"], "ood_groups": {"near": ["digits-near"], "far": ["photo-patches", "noise"]}}})
    assert cfg.data.ood_groups["far"] == ["photo-patches", "noise"] and parse_config(base).data.ood_groups == {}
    for groups, message in [({"near": ["cifar"]}, "data.ood_groups.near"), ({"avg": ["noise"]}, "neither 'avg'"),
                            ({"noise": ["noise"]}, "neither 'avg'"), ({"near": []}, "data.ood_groups.near"),
                            ({"a b": ["noise"]}, "group name")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "data": {**base["data"], "ood_groups": groups}})
    # the new-class failure sources: the near group by default, or errors.new_class_datasets (OOD sets only)
    errors = {"enabled": True}
    cfg = parse_config({**base, "data": {**base["data"], "ood_groups": {"near": ["digits-near"]}}, "errors": errors})
    assert cfg.errors.new_class_sets(cfg.data.ood_groups) == ["digits-near"]
    assert cfg.errors.new_class_sets({}) == []
    with pytest.raises(ConfigError, match="errors.new_class_datasets"):
        parse_config({**base, "errors": {**errors, "new_class_datasets": ["digits"]}})


def test_model_preprocessing_fields_validated_and_applied(tmp_path):
    from jobs.config import ConfigError

    cfg = parse_config({"experiment": "x", "model": {"name": "resnet18", "preset": "cifar", "input_size": 36, "resize": 40}})
    from oodlib.data.preprocess import IMAGENET_PREPROCESS

    pre = cfg.model.preprocess(IMAGENET_PREPROCESS)
    assert pre.size == (36, 36) and pre.resize == 40 and pre.mean[0] == pytest.approx(0.4914)
    with pytest.raises(ConfigError, match="model.*3 value"):
        parse_config({"experiment": "x", "model": {"name": "resnet18", "std": [0.2]}})
    with pytest.raises(ConfigError, match="model.*smaller than"):
        parse_config({"experiment": "x", "model": {"name": "resnet18", "resize": 100}})


def test_verdicts_choices_checked_only_when_verdicts_run():
    from jobs.config import ConfigError

    base = {"experiment": "v", "detectors": ["msp", "energy"]}
    for verdicts, message in [({"primary_detector": "knn"}, r"verdicts.primary_detector: 'knn' is not a configured detector column"),
                              ({"primary_risk": "lcr"}, "verdicts.primary_risk: the risks come from the errors stage")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "verdicts": {"enabled": True, **verdicts}})
        # a switched-off section's leftovers (e.g. the shipped config with verdicts off and fewer detectors) are not an error
        assert parse_config({**base, "verdicts": {"enabled": False, **verdicts}}).verdicts.enabled is False
