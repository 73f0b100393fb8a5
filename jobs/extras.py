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
    """Base: ``columns`` maps each output column to its vector width (an int: float32 vector),
    None (float32 scalar) or a NumPy dtype name for an integer scalar (``"int16"``)."""

    columns: dict[str, int | str | None]

    def __call__(self, model: ModelAdapter, x: torch.Tensor, h: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError


class LayerConductance(Extra):
    """``conductance`` [K]: feature-map conductance of the predicted logit at the configured
    layer (zero baseline, n steps). With the paper's right-end rule its last path point is the
    image itself, so it also *is* the batch's ordinary forward (:meth:`forward`)."""

    def __init__(self, model: ModelAdapter, params: dict, state, device: torch.device) -> None:
        self.layer = params.get("layer") or model.default_layer
        self.n_steps = int(params.get("n_steps", 10))
        self.method = params.get("method", "right_riemann")
        with torch.no_grad():
            channels = _out_channels(model, model.layer(self.layer))
        self.columns = {"conductance": channels}

    def forward(self, model: ModelAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        """(features, logits, columns) from one conductance pass (right rule: x is the last point)."""
        from oodlib.conductance import conductance_forward, layer_conductance

        if self.method == "right_riemann":
            res = conductance_forward(model, x, self.layer, self.n_steps, self.method)
            return res.features.detach(), res.logits.detach(), {"conductance": res.conductance.float().cpu().numpy()}
        with torch.inference_mode():
            h = model.features(x)
            logits = model.head(h)
        cond = layer_conductance(model, x, self.layer, self.n_steps, self.method, target=logits.argmax(1))
        return h, logits, {"conductance": cond.float().cpu().numpy()}


def _out_channels(model: ModelAdapter, layer: torch.nn.Module) -> int:
    """Channels of ``layer``'s output, from a forward hook on a one-image probe."""
    out = {}

    def record(module, inputs, output) -> None:  # returning None keeps the output unchanged
        out["c"] = output.shape[1]

    handle = layer.register_forward_hook(record)
    try:
        size = model.preprocess.size
        model(torch.zeros(1, model.preprocess.channels, *size, device=next(model.parameters()).device))
    finally:
        handle.remove()
    return int(out["c"])


class LabelChangeRate(Extra):
    """``lcr`` (flips / mutants used), ``lcr_mutants_used`` (int16) and, without early stop, the
    flip matrix ``lcr_flips`` [M] (for AUROC vs number of mutants and the post-hoc SPRT).
    Mutants are regenerated here from their (operator, rate, seed) table, never shipped as weights."""

    def __init__(self, model: ModelAdapter, params: dict, state: dict, device: torch.device) -> None:
        import pandas as pd

        from oodlib.lcr import SPRT
        from oodlib.mutants import MutantSet

        mutants = MutantSet.from_frame(pd.DataFrame(state["table"]))
        self.patches = mutants.patches(model)
        self.sprt = SPRT(state["tau"]) if params.get("early_stop") else None
        self.columns = {"lcr": None, "lcr_mutants_used": "int16"}
        if self.sprt is None:
            self.columns["lcr_flips"] = len(self.patches)

    def __call__(self, model, x, h, logits):
        from oodlib.lcr import label_change_rate

        res = label_change_rate(model, x, self.patches, preds=logits.argmax(1), sprt=self.sprt)
        out = {"lcr": res.lcr, "lcr_mutants_used": res.used}
        if self.sprt is None:
            out["lcr_flips"] = res.flips.astype(np.float32)
        return out


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


EXTRAS: dict[str, type[Extra]] = {
    "gfeatures": GaussianizedFeatures, "odin": OdinScore, "conductance": LayerConductance, "lcr": LabelChangeRate,
}


def build_extras(specs: tuple[ExtraSpec, ...], model: ModelAdapter, device: torch.device) -> list[Extra]:
    """Instantiate the extras in the actor, fetching their state from the object store."""
    import ray

    out = []
    for spec in specs:
        state = ray.get(spec.state) if isinstance(spec.state, ray.ObjectRef) else spec.state
        out.append(EXTRAS[spec.name](model, spec.params, state, device))
    return out
