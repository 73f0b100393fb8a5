"""LINE's contribution matrix C (D×C): class-mean Shapley (Taylor) contributions of the
penultimate neurons, from ID-train images with their **true** labels.

Closed form (the head is linear, so ∂f_y/∂a = W[y]):  C[:, k] = W[k] ⊙ mean_{i: yᵢ=k} hᵢ,
computed from mergeable :class:`~oodlib.stats.ClassMoments` (one batched no-grad pass).
:func:`taylor_contributions` (sᵢ = aᵢ·∂f_y/∂aᵢ by autograd) and :func:`intgrad_contributions`
(paper Appendix C, eq. 9) are the per-image reference forms; :func:`class_mean_contributions`
turns either into a D×C matrix.
"""
from __future__ import annotations

import numpy as np
import torch

from oodlib.models.base import ModelAdapter
from oodlib.stats import ClassMoments


def contribution_matrix(moments: ClassMoments, W: np.ndarray) -> np.ndarray:
    """C = (W ⊙ class means)ᵀ, float32 D×C; W is the head weight (C×D). Every class needs rows."""
    return np.ascontiguousarray((np.asarray(W, np.float64) * moments.means).T, dtype=np.float32)


@torch.no_grad()
def features_and_moments(
    model: ModelAdapter, x: torch.Tensor, y: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, ClassMoments]:
    """Features h (N×D float32) of inputs x (N×…) and their class moments under labels y (N,)."""
    device = next(model.parameters()).device
    feats = [model.features(x[i : i + batch_size].to(device)).float().cpu().numpy() for i in range(0, len(x), batch_size)]
    h = np.concatenate(feats) if feats else np.zeros((0, model.feature_dim), np.float32)
    return h, ClassMoments.from_batch(h, y, model.num_classes)


def model_contribution_matrix(model: ModelAdapter, x: torch.Tensor, y: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Closed-form C (D×C) of a model over ID-train inputs x with true labels y (no-grad pass)."""
    _, moments = features_and_moments(model, x, y, batch_size)
    return contribution_matrix(moments, model.head_arrays()[0])


def taylor_contributions(model: ModelAdapter, x: torch.Tensor, y: np.ndarray) -> np.ndarray:
    """Per-image Taylor contributions sᵢ = aᵢ·∂f_y/∂aᵢ at the penultimate layer (N×D, float64).

    The gradient of Σₙ f_{yₙ}(aₙ) w.r.t. the penultimate activations a (by autograd through the
    head) gives every row's own gradient, since rows do not interact in eval mode.
    """
    device = next(model.parameters()).device
    target = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    with torch.no_grad():
        a = model.features(x.to(device))
    a.requires_grad_(True)
    with torch.enable_grad():
        f = model.head(a)
        (grad,) = torch.autograd.grad(f.gather(1, target[:, None]).sum(), a)
    return a.detach().double().cpu().numpy() * grad.double().cpu().numpy()


def intgrad_contributions(model: ModelAdapter, x: torch.Tensor, y: np.ndarray, steps: int = 32) -> np.ndarray:
    """Integrated-gradient contributions sᵢ = aᵢ ∫₀¹ ∂f_y(αa)/∂aᵢ dα (paper eq. 9), N×D float64.

    The integral is the midpoint rule with ``steps`` points, by autograd through ``model.head``; for a
    linear head the integrand is constant, so it equals the Taylor form up to rounding.
    """
    device = next(model.parameters()).device
    target = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    with torch.no_grad():
        a = model.features(x.to(device))
    total = torch.zeros_like(a, dtype=torch.float64)
    for alpha in (np.arange(steps) + 0.5) / steps:
        scaled = (float(alpha) * a).requires_grad_(True)
        with torch.enable_grad():
            f = model.head(scaled)
            (grad,) = torch.autograd.grad(f.gather(1, target[:, None]).sum(), scaled)
        total += grad.double()
    return (a.double() * total / steps).cpu().numpy()


def class_mean_contributions(s: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Class means of per-image contributions s (N×D) under labels y → D×C float32."""
    return np.ascontiguousarray(ClassMoments.from_batch(s, y, num_classes).means.T, dtype=np.float32)
