"""Explanations: RAP, Attribution Equilibrium, LRP baselines and gradient baselines.

Entry points (whole batches in memory; the model and x on the same device — CPU or CUDA):

* :func:`attribute` → relevance of every input element (B×C×H×W), logits and targets;
* :func:`explain` → relevance maps summed over channels (B×H×W), the form that is displayed,
  stored and scored by :mod:`oodlib.attribution.localization`.

Methods (:data:`METHODS`): ``rap``, ``ae`` (options ``gamma``, ``terms``), ``lrp-eps`` (``epsilon``),
``lrp-a1b0``, ``lrp-a2b1``, ``gradient``, ``input-x-gradient``, ``integrated-gradients``
(``steps``), ``gradcam`` (``layer``). The explained class is the prediction unless ``target`` is
given (an int or one per sample).
"""
from __future__ import annotations

import torch

from oodlib.attribution import baselines
from oodlib.attribution.engine import _targets, propagate
from oodlib.attribution.program import UnsupportedLayerError, build_program
from oodlib.attribution.rules import (
    AE_TERMS,
    RAP,
    AttributionEquilibrium,
    LRPAlphaBeta,
    LRPEpsilon,
)

PROPAGATION = ("rap", "ae", "lrp-eps", "lrp-a1b0", "lrp-a2b1")
GRADIENT = ("gradient", "input-x-gradient", "integrated-gradients", "gradcam")
METHODS = PROPAGATION + GRADIENT

#: AE ablation settings (paper Table 2) → the ``terms`` option.
AE_ABLATION = {
    "C": ("C",),
    "C+Psi": ("C", "shift"),
    "A+U": ("A", "U"),
    "C+A+U": ("C", "A", "U"),
    "all": AE_TERMS,
}


def make_rule(method: str, **options):
    """The propagation rule object for ``method`` (see :data:`PROPAGATION`)."""
    if method == "rap":
        return RAP(**options)
    if method == "ae":
        return AttributionEquilibrium(**options)
    if method == "lrp-eps":
        return LRPEpsilon(**options)
    if method == "lrp-a1b0":
        return LRPAlphaBeta(1.0, 0.0, **options)
    if method == "lrp-a2b1":
        return LRPAlphaBeta(2.0, 1.0, **options)
    raise KeyError(f"unknown propagation method {method!r}; known: {PROPAGATION}")


@torch.no_grad()
def attribute(model, x: torch.Tensor, method: str = "rap", target=None, program: list | None = None, **options):
    """Input relevance (B×C×H×W; Grad-CAM B×1×H×W), logits (B×K) and targets (B,) for ``method``.

    ``program``: a cached :func:`~oodlib.attribution.program.build_program` result (saves rebuilding).
    """
    if method in PROPAGATION:
        return propagate(model, x, make_rule(method, **options), target, program)
    if method not in GRADIENT:
        raise KeyError(f"unknown attribution method {method!r}; known: {METHODS}")
    logits = model(x)
    t = _targets(logits, target)
    fn = {
        "gradient": baselines.gradient,
        "input-x-gradient": baselines.input_x_gradient,
        "integrated-gradients": baselines.integrated_gradients,
        "gradcam": baselines.gradcam,
    }[method]
    return fn(model, x, t, **options), logits, t


def explain(model, x: torch.Tensor, method: str = "rap", target=None, program: list | None = None, **options):
    """Relevance maps summed over channels (B×H×W), logits and targets — see :func:`attribute`."""
    rel, logits, t = attribute(model, x, method, target, program, **options)
    return rel.sum(1), logits, t


__all__ = [
    "AE_ABLATION",
    "METHODS",
    "UnsupportedLayerError",
    "attribute",
    "build_program",
    "explain",
    "make_rule",
]
