"""Model adapters: ``load_model(name, ...)`` returns a :class:`ModelAdapter` in eval mode."""
from __future__ import annotations

from pathlib import Path

from oodlib.data.preprocess import Preprocess
from oodlib.models.base import ModelAdapter
from oodlib.models.torchvision_models import (
    TORCHVISION_MODELS, WeightsError, build_torchvision, head_classes, load_state_dict_file,
)

MODELS = ("digits-cnn", "densenet-bc-100", "standin-imagenet", *TORCHVISION_MODELS)


def load_model(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    preprocess: Preprocess | None = None,
    cache_dir: str | Path | None = None,
) -> ModelAdapter:
    """Build model ``name`` with its weights.

    ``digits-cnn`` trains on first use (cached under ``cache_dir``) unless ``weights`` names a
    file; torchvision models take a file or a weights name (see :func:`build_torchvision`);
    ``num_classes`` None = from the weights (else 1000); ``preprocess`` None = the model's own.
    """
    if name == "digits-cnn":
        from oodlib.models.digits_cnn import build_digits_cnn, trained_digits_cnn

        if weights is None:
            return with_preprocess(trained_digits_cnn(cache_dir=cache_dir), preprocess)
        model = build_digits_cnn()
        model.load_state_dict(load_state_dict_file(weights))
        return with_preprocess(model.eval(), preprocess)
    if name == "densenet-bc-100":
        from oodlib.models.densenet_bc import build_densenet_bc100

        if num_classes is None:
            num_classes = head_classes(load_state_dict_file(weights)) if weights is not None else 1000
        return with_preprocess(build_densenet_bc100(num_classes, weights), preprocess)
    if name == "standin-imagenet":  # a fixed seeded initialization unless weights are given
        model = build_model(name, num_classes or 1000, preprocess)
        if weights is not None:
            model.load_state_dict(load_state_dict_file(weights))
        return model
    if name in TORCHVISION_MODELS:
        return build_torchvision(name, weights, num_classes, preprocess)
    raise KeyError(f"unknown model {name!r}; known: {MODELS}")


def with_preprocess(model: ModelAdapter, preprocess: Preprocess | None) -> ModelAdapter:
    """``model`` with ``preprocess`` (None keeps its own)."""
    if preprocess is not None:
        model.preprocess = preprocess
    return model


def build_model(name: str, num_classes: int = 1000, preprocess: Preprocess | None = None) -> ModelAdapter:
    """The architecture of model ``name`` with untrained weights (to load a state dict into)."""
    if name == "digits-cnn":
        from oodlib.models.digits_cnn import build_digits_cnn

        return with_preprocess(build_digits_cnn().eval(), preprocess)
    if name == "densenet-bc-100":
        from oodlib.models.densenet_bc import build_densenet_bc100

        return with_preprocess(build_densenet_bc100(num_classes).eval(), preprocess)
    if name == "standin-imagenet":
        from oodlib.models.standin import build_standin

        return with_preprocess(build_standin(num_classes), preprocess)
    if name in TORCHVISION_MODELS:
        return build_torchvision(name, None, num_classes, preprocess)
    raise KeyError(f"unknown model {name!r}; known: {MODELS}")


__all__ = ["MODELS", "build_model", "ModelAdapter", "WeightsError", "load_model"]
