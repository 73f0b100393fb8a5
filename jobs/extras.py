"""Per-image extras computed in the EMBED actor while the decoded batch is on the device.

Each extra is one registered class that declares itself: the columns it ``provides``, when a
config wants it and with which parameters (:meth:`Extra.wanted`), the upstream stages whose
results it needs (``upstream``) and the state it ships to the actors (:meth:`Extra.state`).
A detector that reads an extra names its column in ``Detector.requires``; a
:class:`DetectorInput` extra is then wanted with that detector's hyperparameters — adding such a
detector is one file in ``oodlib/detectors/`` plus one class here.

In the actor an extra is built from an :class:`ExtraSpec` and returns NumPy columns for the rows
that decoded (EMBED writes zeros for quarantined rows, which never reach the features table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from jobs.config import JobConfig
from jobs.workers import fetch, model_state_arrays, rebuild_model
from oodlib.estimator import subclasses
from oodlib.models import ModelAdapter


@dataclass(frozen=True)
class ExtraSpec:
    """What the actor needs to build one extra: its name, parameters and (a reference to) its state."""

    name: str
    params: dict = field(default_factory=dict)
    state: object = None  # ray.ObjectRef or a plain value


class Extra:
    """Base. ``columns`` (set per instance) maps each output column to its vector width (an int:
    float32 vector), None (float32 scalar) or a NumPy dtype name for an integer scalar."""

    name: ClassVar[str]
    #: column names this extra writes (the widths may depend on the model)
    provides: ClassVar[tuple[str, ...]]
    #: upstream stages whose results :meth:`state` reads
    upstream: ClassVar[tuple[str, ...]] = ()
    columns: dict[str, int | str | None]

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        """This extra's parameters under ``cfg``, or None when the config does not need it."""
        raise NotImplementedError

    @classmethod
    def state(cls, params: dict, up: dict[str, Any]) -> tuple[object, object]:
        """(state shipped to the actors, what identifies it in EMBED's content key)."""
        return None, None

    def __init__(self, model: ModelAdapter, params: dict, state, device: torch.device) -> None:
        self.params = params

    def __call__(self, model: ModelAdapter, x: torch.Tensor, h: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError


class DetectorInput(Extra):
    """An extra a detector reads: wanted when a configured detector ``requires`` one of its
    columns, with that detector's hyperparameters (the config allows one setting per column)."""

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        from oodlib.detectors import DETECTORS

        for d in cfg.detectors:
            det = DETECTORS[d.name]
            if set(det.requires) & set(cls.provides):
                return det(**d.params).params()
        return None


class OdinScore(DetectorInput):
    """``odin``: ODIN's temperature-scaled, input-perturbed MSP (needs input gradients, so it is
    computed here while the image is in memory rather than from stored features)."""

    name = "odin"
    provides = ("odin",)

    def __init__(self, model, params, state, device) -> None:
        super().__init__(model, params, state, device)
        self.columns = {"odin": None}

    def __call__(self, model, x, h, logits):
        from oodlib.detectors import odin_score

        return {"odin": odin_score(model, x, self.params["temperature"], self.params["epsilon"])}


class LayerConductance(Extra):
    """``conductance`` [K]: feature-map conductance of the predicted logit at the configured
    layer (zero baseline, n steps). With the paper's right-end rule its last path point is the
    image itself, so it also *is* the batch's ordinary forward (:meth:`forward`)."""

    name = "conductance"
    provides = ("conductance",)

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        e = cfg.errors
        return {"layer": e.layer, "n_steps": e.n_steps, "method": e.method} if e.enabled else None

    def __init__(self, model, params, state, device) -> None:
        super().__init__(model, params, state, device)
        self.layer = params.get("layer") or model.default_layer
        self.n_steps, self.method = int(params["n_steps"]), params["method"]
        with torch.no_grad():
            channels = _out_channels(model, model.layer(self.layer))
        self.columns = {"conductance": channels}

    def forward(self, model: ModelAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
        """(features, logits, columns) from one conductance pass (right rule: x is the last point)."""
        from oodlib.errors.conductance import conductance_forward, layer_conductance

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

    name = "lcr"
    provides = ("lcr", "lcr_mutants_used", "lcr_flips")
    upstream = ("mutants",)

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        return {"early_stop": cfg.errors.sprt.early_stop} if cfg.errors.enabled else None

    @classmethod
    def state(cls, params: dict, up: dict[str, Any]) -> tuple[object, object]:
        mutants = up["mutants"]
        return {"table": mutants.table, "tau": mutants.tau}, mutants.path.name

    def __init__(self, model, params, state, device) -> None:
        import pandas as pd

        from oodlib.errors.lcr import SPRT
        from oodlib.errors.mutants import MutantSet

        super().__init__(model, params, state, device)
        self.patches = MutantSet.from_frame(pd.DataFrame(state["table"])).patches(model)
        self.sprt = SPRT(state["tau"]) if params["early_stop"] else None
        self.columns = {"lcr": None, "lcr_mutants_used": "int16"}
        if self.sprt is None:
            self.columns["lcr_flips"] = len(self.patches)

    def __call__(self, model, x, h, logits):
        from oodlib.errors.lcr import label_change_rate

        res = label_change_rate(model, x, self.patches, preds=logits.argmax(1), sprt=self.sprt)
        out = {"lcr": res.lcr, "lcr_mutants_used": res.used}
        if self.sprt is None:
            out["lcr_flips"] = res.flips.astype(np.float32)
        return out


class GaussianizedFeatures(Extra):
    """``gfeatures`` [D]: penultimate features of the BN-recalibrated (Gaussianized) model."""

    name = "gfeatures"
    provides = ("gfeatures",)
    upstream = ("gaussianize",)

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        return {} if cfg.graph.enabled else None

    @classmethod
    def state(cls, params: dict, up: dict[str, Any]) -> tuple[object, object]:
        g = up["gaussianize"]
        return model_state_arrays(g.model), g.path.name

    def __init__(self, model, params, state, device) -> None:
        super().__init__(model, params, state, device)
        self.gmodel = rebuild_model(model.name, model.num_classes, state, device)
        self.columns = {"gfeatures": model.feature_dim}

    @torch.inference_mode()
    def __call__(self, model, x, h, logits):
        return {"gfeatures": self.gmodel.features(x).float().cpu().numpy()}


EXTRAS: dict[str, type[Extra]] = {cls.name: cls for cls in subclasses(Extra)}


def wanted_extras(cfg: JobConfig) -> dict[str, dict]:
    """{extra name: parameters} of every extra ``cfg`` needs, in registry order."""
    return {name: p for name, cls in EXTRAS.items() if (p := cls.wanted(cfg)) is not None}


def upstream_stages(cfg: JobConfig) -> tuple[str, ...]:
    """The stages the wanted extras need results from."""
    return tuple(dict.fromkeys(s for name in wanted_extras(cfg) for s in EXTRAS[name].upstream))


def build_extras(specs: tuple[ExtraSpec, ...], model: ModelAdapter, device: torch.device) -> list[Extra]:
    """Instantiate the extras in the actor, fetching their state from the object store."""
    return [EXTRAS[s.name](model, s.params, fetch(s.state), device) for s in specs]
