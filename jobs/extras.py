"""Per-image extras computed in the EMBED actor while the decoded batch is on the device.

Each extra is one registered class that declares itself: the columns it ``provides``, when a
config wants it and with which parameters (:meth:`Extra.wanted`), the upstream stages whose
results it needs (``upstream``) and the state it ships to the actors (:meth:`Extra.state`).
A detector that reads an extra names its column in ``Detector.requires``; a
:class:`DetectorInput` extra is then wanted with that detector's hyperparameters — adding such a
detector is one file in ``oodlib/detectors/`` plus one class here.

Each extra also declares the manifest rows it is needed on (:meth:`Extra.rows`, a
:class:`jobs.rows.RowNeeds`): EMBED computes it only there (its columns are missing elsewhere: null
scalars, all-NaN vectors) — e.g. ODIN not on the ID train split, which no score reads.

In the actor an extra is built from an :class:`ExtraSpec` and returns NumPy columns for the rows
it is called with (the decoded rows that need it).
"""
from __future__ import annotations

import weakref
from typing import Any, ClassVar

import numpy as np
import torch

from jobs.config import JobConfig
from jobs.extra_base import DetectorInput, Extra, ExtraSpec
from jobs.rows import RowNeeds, errors_rows, graph_rows
from jobs.workers import fetch, model_state_arrays, rebuild_model
from oodlib.estimator import subclasses
from oodlib.models import ModelAdapter

__all__ = ["DetectorInput", "Extra", "ExtraSpec", "EXTRAS", "build_extras", "extra_rows", "upstream_stages", "wanted_extras"]


class OdinScore(DetectorInput):
    """``odin``: ODIN's temperature-scaled, input-perturbed MSP (needs input gradients, so it is
    computed here while the image is in memory rather than from stored features)."""

    name = "odin"
    provides = ("odin",)

    @classmethod
    def passes(cls, params: dict, cfg: JobConfig) -> tuple[float, float]:
        return 2.0, 1.0  # forward + backward to the input, then the perturbed forward

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

    @classmethod
    def rows(cls, cfg: JobConfig) -> RowNeeds:
        return errors_rows(cfg)

    @classmethod
    def passes(cls, params: dict, cfg: JobConfig) -> tuple[float, float]:
        return float(params["n_steps"]), float(params["n_steps"])  # the right rule's last step is the forward

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
    def rows(cls, cfg: JobConfig) -> RowNeeds:
        return errors_rows(cfg)

    @classmethod
    def passes(cls, params: dict, cfg: JobConfig) -> tuple[float, float]:
        return float(cfg.errors.mutants.n_accepted), 0.0  # one forward per mutant (fewer with early stop)

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
    def rows(cls, cfg: JobConfig) -> RowNeeds:
        return graph_rows(cfg)

    @classmethod
    def state(cls, params: dict, up: dict[str, Any]) -> tuple[object, object]:
        g = up["gaussianize"]
        return model_state_arrays(g.model), g.path.name

    def __init__(self, model, params, state, device) -> None:
        super().__init__(model, params, state, device)
        self.gmodel = rebuild_model(model.name, model.num_classes, state, device, model.preprocess)
        self.columns = {"gfeatures": model.feature_dim}

    @torch.inference_mode()
    def __call__(self, model, x, h, logits):
        return {"gfeatures": self.gmodel.features(x).float().cpu().numpy()}


class SharedLayerPass:
    """One :func:`oodlib.layers.layer_pass` per batch for a group of layer-statistics extras (those
    :func:`build_extras` builds together): the first member called for a batch computes every
    member's request in one hooked forward (plus the backward passes NAC and AdaSCALE need); the
    others read the cached result."""

    def __init__(self, members: list["LayerStatistic"]) -> None:
        self.members = list(members)
        #: the members computed on the rows of the coming batch (:meth:`Extra.with_peers`); None = all
        self.current: list | None = None
        self._batch: tuple | None = None  # (weakref to the batch tensor, its members, its PassOutput)

    def run(self, model: ModelAdapter, x: torch.Tensor, extra: "LayerStatistic"):
        """(features, logits, ``extra``'s columns) of batch x, computed once for every member
        computed on these rows."""
        from oodlib.layers import layer_pass

        if self._batch is None or self._batch[0]() is not x or extra not in self._batch[1]:
            members = [m for m in self.members if self.current is None or m in self.current] or [extra]
            self._batch = (weakref.ref(x), members, layer_pass(model, x, [m.request for m in members]))
        out = self._batch[2]
        return out.features, out.logits, out.columns[self._batch[1].index(extra)]


class LayerStatistic(DetectorInput):
    """Base of the extras computed by the shared layer pass (:mod:`oodlib.layers`). Only the
    detector hyperparameters in ``extra_params`` reach EMBED (and its key); ``layers=None``
    becomes the model's default layers of ``statistic``. Each has ``forward``: the shared pass
    also *is* the batch's ordinary forward (unless another extra provides it)."""

    statistic: ClassVar[str | None] = None
    extra_params: ClassVar[tuple[str, ...]] = ("layers",)
    detector: ClassVar[str]
    #: (forward, backward) passes per row of this statistic alone (shared passes cost less)
    cost: ClassVar[tuple[float, float]] = (1.0, 0.0)

    @classmethod
    def passes(cls, params: dict, cfg: JobConfig) -> tuple[float, float]:
        return cls.cost

    @classmethod
    def embed_params(cls, params: dict, cfg: JobConfig) -> dict:
        from oodlib.layers import default_layers

        params = {k: params[k] for k in cls.extra_params}
        if "layers" in params and params["layers"] is None:
            params["layers"] = list(default_layers(cls.statistic, cfg.model.name, cls.detector))
        return params

    def __init__(self, model, params, state, device) -> None:
        super().__init__(model, params, state, device)
        self.request = self.make_request(model, params)
        self.shared = SharedLayerPass([self])  # build_extras groups the extras built together

    #: the :mod:`oodlib.layers` request class of a statistic of pooled layer maps (its column = ``statistic``)
    request_type: ClassVar[str | None] = None

    def request_args(self, params: dict) -> tuple:
        """Arguments of ``request_type`` after the layers."""
        return ()

    def make_request(self, model: ModelAdapter, params: dict):
        import oodlib.layers

        request = getattr(oodlib.layers, self.request_type)(tuple(params["layers"]), *self.request_args(params))
        self._layered(model, request, self.statistic)
        return request

    def _layered(self, model: ModelAdapter, request, column: str) -> None:
        from oodlib.layers import check_layers, layer_widths

        check_layers(model, request.layers, self.detector)
        sizes = request.sizes(layer_widths(model, request.layers))
        self.columns = {column: int(sum(sizes)), f"{column}_sizes": len(sizes)}

    def with_peers(self, peers: list[Extra]) -> None:
        self.shared.current = [p for p in peers if p in self.shared.members]

    def forward(self, model, x):
        return self.shared.run(model, x, self)

    def __call__(self, model, x, h, logits):
        return self.shared.run(model, x, self)[2]


class GramStatistics(LayerStatistic):
    """``gram`` [Σₗ P·Cₗ] + ``gram_sizes`` [L]: row-summed Gram matrices per layer and power."""

    name = detector = statistic = "gram"
    provides = ("gram", "gram_sizes")
    extra_params = ("layers", "powers")
    request_type = "Gram"

    def request_args(self, params):
        return (tuple(int(p) for p in params["powers"]),)


class LayerMeanStatistics(LayerStatistic):
    """``layer_means`` [Σₗ Cₗ] + ``layer_means_sizes`` [L]: spatial means of the layers' maps."""

    name = statistic = "layer_means"
    detector = "multi_mahalanobis"
    provides = ("layer_means", "layer_means_sizes")
    request_type = "LayerMeans"


class NacStatistics(LayerStatistic):
    """``nac`` [Σₗ Cₗ] + ``nac_sizes`` [L]: NAC's pre-sigmoid neuron states ō·ḡ (needs ∂L/∂o)."""

    name = detector = statistic = "nac"
    cost = (1.0, 1.0)
    provides = ("nac", "nac_sizes")
    request_type = "NacStates"


class RankFeatStatistic(LayerStatistic):
    """``rankfeat``: RankFeat's fused energy after rank-1 removal (reruns the network above each layer)."""

    name = detector = statistic = "rankfeat"
    cost = (2.0, 0.0)
    provides = ("rankfeat",)
    extra_params = ("layers", "temperature")

    def make_request(self, model, params):
        from oodlib.layers import RankFeat, check_layers

        layers = check_layers(model, params["layers"], self.detector, pooled=False)
        self.columns = {"rankfeat": None}
        return RankFeat(layers, float(params["temperature"]))


class AdaScaleStatistics(LayerStatistic):
    """``adascale_correction``, ``adascale_shift``: AdaSCALE's terms (needs ∇ₓ and a second forward)."""

    name = "adascale"
    cost = (2.0, 1.0)
    detector = "adascale_a"
    provides = ("adascale_correction", "adascale_shift")
    extra_params = ("k1", "k2", "o")

    def make_request(self, model, params):
        from oodlib.layers import AdaScale

        self.columns = {"adascale_correction": None, "adascale_shift": None}
        return AdaScale(float(params["k1"]), float(params["k2"]), float(params["o"]))


EXTRAS: dict[str, type[Extra]] = {cls.name: cls for cls in subclasses(Extra)}


def wanted_extras(cfg: JobConfig) -> dict[str, dict]:
    """{extra name: parameters} of every extra ``cfg`` needs, in registry order."""
    return {name: p for name, cls in EXTRAS.items() if (p := cls.wanted(cfg)) is not None}


def extra_rows(cfg: JobConfig) -> dict[str, RowNeeds]:
    """{extra name: the rows it is computed on} of every wanted extra, in registry order."""
    return {name: EXTRAS[name].rows(cfg) for name in wanted_extras(cfg)}


def upstream_stages(cfg: JobConfig) -> tuple[str, ...]:
    """The stages the wanted extras need results from."""
    return tuple(dict.fromkeys(s for name in wanted_extras(cfg) for s in EXTRAS[name].upstream))


def build_extras(specs: tuple[ExtraSpec, ...], model: ModelAdapter, device: torch.device) -> list[Extra]:
    """Instantiate the extras in the actor, fetching their state from the object store; the
    layer-statistics extras among them share one pass per batch (:class:`SharedLayerPass`)."""
    extras = [EXTRAS[s.name](model, s.params, fetch(s.state), device) for s in specs]
    layered = [e for e in extras if isinstance(e, LayerStatistic)]
    shared = SharedLayerPass(layered)
    for e in layered:
        e.shared = shared
    return extras
