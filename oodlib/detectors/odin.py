"""ODIN (Liang et al. 2018): temperature scaling plus a small input perturbation.

The perturbation needs input gradients, so it runs in EMBED while the image batch is in memory:
:func:`odin_score` writes the ``odin`` extra column, and :class:`ODIN` just reads it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oodlib.detectors.base import Detector, ScoreInputs
from oodlib.models.base import ModelAdapter


def odin_score(model: ModelAdapter, x: torch.Tensor, temperature: float = 1000.0, epsilon: float = 0.0014) -> np.ndarray:
    """ODIN ID-confidence of a normalized input batch x (B×C×H×W) → float32 (B,).

    x̃ = x − ε·sign(∇ₓ[−log softmax(f(x)/T)_ŷ]) / std (ŷ = argmax f(x); ``std`` = the per-channel
    normalization std of ``model.preprocess``, so ε is a step in [0, 1] pixel units), and the
    score is max softmax(f(x̃)/T). Only the input receives gradients (parameters are untouched);
    runs on the model's device.
    """
    device = next(model.parameters()).device
    x = x.detach().to(device).clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x) / temperature
        # summed loss: each row's gradient depends on that row only
        loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    std = torch.as_tensor(model.preprocess.std, dtype=x.dtype, device=device).view(1, -1, *([1] * (x.ndim - 2)))
    x_tilde = x.detach() - epsilon * grad.sign() / std
    with torch.no_grad():
        probs = torch.softmax(model(x_tilde).double() / temperature, dim=1)
    return probs.max(dim=1).values.float().cpu().numpy()


class ODIN(Detector):
    """Reads the per-image ``odin`` column computed by :func:`odin_score` in EMBED."""

    name = "odin"
    requires = ("odin",)

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014) -> None:
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return np.asarray(inputs.extras["odin"], np.float32)
