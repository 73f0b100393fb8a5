"""Warnings about results a user probably did not mean."""
import pandas as pd

from jobs.sanity import gradcam_warning, result_warnings
from oodlib.data.preprocess import CIFAR_PREPROCESS
from oodlib.models import load_model


def metrics(acc: float) -> pd.DataFrame:
    return pd.DataFrame([{"task": "classify", "method": "model", "dataset": "id", "metric": "acc", "value": acc}])


def test_chance_accuracy_and_small_sets_are_warned():
    assert result_warnings(metrics(0.93), {"id test": 500, "ood": 200}, "id", 10) == []
    found = result_warnings(metrics(0.11), {"id test": 500, "ood": 19}, "id", 10)
    assert len(found) == 2 and "at chance" in found[0] and "ood: metrics computed on 19 image(s)" in found[1]


def test_gradcam_on_a_one_pixel_layer_is_warned(digits_model):
    assert gradcam_warning(digits_model) is None  # 32 px digits: a 4×4 last block
    small = load_model("resnet18", None, num_classes=10, preprocess=CIFAR_PREPROCESS)  # layer4 is 1×1 at 32 px
    assert "is 1×1" in gradcam_warning(small)
