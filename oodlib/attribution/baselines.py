"""Gradient baselines on a whole batch: gradient, input×gradient, integrated gradients, Grad-CAM.

All take a model (``ModelAdapter``), a normalized batch x (B×C×H×W) and targets (B,), and return
B×C×H×W attributions (Grad-CAM: B×1×H×W, bilinearly upsampled to the input size). Per-sample
gradients come from one autograd call on the sum of the target logits (samples are independent
in eval mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _target_grad(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂y_t/∂x for every sample (B×C×H×W)."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        y = model(xr).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(y, xr)
    return g


def gradient(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Saliency: ∂y_t/∂x."""
    return _target_grad(model, x, target)


def input_x_gradient(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x ⊙ ∂y_t/∂x."""
    return x * _target_grad(model, x, target)


def integrated_gradients(
    model, x: torch.Tensor, target: torch.Tensor, steps: int = 32, baseline: float = 0.0, chunk: int = 64
) -> torch.Tensor:
    """(x − x₀) ⊙ mean over the Gauss–Legendre nodes α of ∂y_t/∂x(x₀ + α(x − x₀)) (Captum's default
    method), x₀ = ``baseline`` (0 = the dataset mean after normalization). Steps are batched in chunks
    of ``chunk`` inputs."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.as_tensor((nodes + 1) / 2, dtype=x.dtype, device=x.device)
    wts = torch.as_tensor(weights / 2, dtype=x.dtype, device=x.device)
    x0 = torch.full_like(x, baseline)
    total = torch.zeros_like(x)
    per = max(1, chunk // x.shape[0])
    for s in range(0, steps, per):
        a = alphas[s : s + per]
        xs = (x0[None] + a[:, None, None, None, None] * (x - x0)[None]).flatten(0, 1)
        g = _target_grad(model, xs, target.repeat(len(a))).view(len(a), *x.shape)
        total += (wts[s : s + per, None, None, None, None] * g).sum(0)
    return (x - x0) * total


def gradcam(model, x: torch.Tensor, target: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM at ``model.layer(layer)`` (default: the last conv block): ReLU(Σ_c mean_hw(∂y_t/∂A_c)·A_c),
    upsampled bilinearly to the input size (B×1×H×W)."""
    module = model.layer(layer)
    store: dict = {}

    def hook(_m, _i, out):
        store["a"] = out

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            y = model(x.detach()).gather(1, target[:, None]).sum()
            a = store["a"]
            (g,) = torch.autograd.grad(y, a)
    finally:
        handle.remove()
    cam = F.relu((g.mean((2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
