"""Per-image extras computed in the EMBED actor while the decoded batch is on the device.

Each extra calls ``oodlib`` and returns NumPy columns for the rows that decoded; EMBED writes
them next to ``features`` (zeros for quarantined rows, which never reach the features table).
An extra is built in the actor from an :class:`ExtraSpec`: its name, its parameters and, where
it needs fitted state (e.g. the Gaussianized model's weights), an object-store reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from oodlib.models import ModelAdapter


@dataclass(frozen=True)
class ExtraSpec:
    name: str
    params: dict = field(default_factory=dict)
    state: object = None  # ray.ObjectRef or a plain value


class Extra:
    """Base: ``columns`` maps each output column to its vector width (None = float32 scalar)."""

    columns: dict[str, int | None]

    def __call__(self, model: ModelAdapter, x: torch.Tensor, h: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError


class GaussianizedFeatures(Extra):
    """``gfeatures`` [D]: penultimate features of the BN-recalibrated (Gaussianized) model."""

    def __init__(self, model: ModelAdapter, params: dict, state: dict[str, np.ndarray], device: torch.device) -> None:
        from jobs.embed import rebuild_model

        self.gmodel = rebuild_model(model.name, model.num_classes, state, device)
        self.columns = {"gfeatures": model.feature_dim}

    @torch.inference_mode()
    def __call__(self, model, x, h, logits):
        return {"gfeatures": self.gmodel.features(x).float().cpu().numpy()}


class OdinScore(Extra):
    """``odin``: ODIN's temperature-scaled, input-perturbed MSP (needs input gradients, so it is
    computed here while the image is in memory rather than from stored features)."""

    columns = {"odin": None}

    def __init__(self, model: ModelAdapter, params: dict, state, device: torch.device) -> None:
        self.temperature = float(params.get("temperature", 1000.0))
        self.epsilon = float(params.get("epsilon", 0.0014))

    def __call__(self, model, x, h, logits):
        from oodlib.detectors import odin_score

        return {"odin": odin_score(model, x, self.temperature, self.epsilon)}


EXTRAS: dict[str, type[Extra]] = {"gfeatures": GaussianizedFeatures, "odin": OdinScore}


def build_extras(specs: tuple[ExtraSpec, ...], model: ModelAdapter, device: torch.device) -> list[Extra]:
    """Instantiate the extras in the actor, fetching their state from the object store."""
    import ray

    out = []
    for spec in specs:
        state = ray.get(spec.state) if isinstance(spec.state, ray.ObjectRef) else spec.state
        out.append(EXTRAS[spec.name](model, spec.params, state, device))
    return out
