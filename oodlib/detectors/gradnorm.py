"""Gradient-norm scores of the last layer's weights in closed form (no backward pass).

For logits z = Wh + b, ∂L/∂W = (∂L/∂z) hᵀ is an outer product, so its entrywise norms factor:
‖∂L/∂W‖₁ = ‖∂L/∂z‖₁‖h‖₁ and ‖∂L/∂W‖₂² = ‖∂L/∂z‖₂²‖h‖₂².
"""
from __future__ import annotations

import numpy as np
from scipy.special import softmax

from oodlib.detectors.base import Detector, ScoreInputs


class GradNorm(Detector):
    """GradNorm (Huang et al. 2021): s = ‖∂L/∂W‖₁ for L = Σ_k −log softmax(z/T)_k (targets all ones,
    no 1/C, as OpenOOD and the authors' code), W the last layer's weights; ∂L/∂z = (Cp − 1)/T, so
    s = (C/T)·‖p − u‖₁·‖h‖₁ (u uniform). T = 1.

    pytorch-ood's ``GradNorm`` averages over the classes (1/C), backpropagates to every parameter
    unless ``param_filter`` picks the weight, and returns −s/C with that filter.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/gradnorm_postprocessor.py>`__
    """

    name = "gradnorm"
    requires = ("features", "logits")

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        z = np.asarray(inputs.logits, np.float64)
        n_classes = z.shape[1]
        p = softmax(z / self.temperature, axis=1)
        h1 = np.abs(np.asarray(inputs.features, np.float64)).sum(axis=1)
        return n_classes / self.temperature * np.abs(p - 1.0 / n_classes).sum(axis=1) * h1


class GradUncertainty(Detector):
    """Gradient uncertainty (Oberdiek et al. 2018, as pytorch-ood 0.4 scores it): s = ‖∂L/∂W‖₂²
    for L = Σ_k BCE(p_k, 1) = Σ_k −log p_k, W the last layer's weights; ∂L/∂z = Cp − 1, so
    s = ‖Cp − 1‖₂²·‖h‖₂². pytorch-ood's ``GradUncertainty`` with ``param_filter`` on the weight
    returns −s (torch's BCE clamps its log and gradient, which only matters for saturated p).

    :see Implementation: `pytorch-ood 0.4.0 <https://pypi.org/project/pytorch-ood/0.4.0/>`__ ``pytorch_ood/detector/graduncertainty.py``
    """

    name = "graduncertainty"
    requires = ("features", "logits")

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        z = np.asarray(inputs.logits, np.float64)
        g = z.shape[1] * softmax(z, axis=1) - 1.0
        h = np.asarray(inputs.features, np.float64)
        return (g * g).sum(axis=1) * (h * h).sum(axis=1)
