"""Layer conductance of the predicted class, summed per feature map (seed paper eq. 2–5).

For an input x (normalized), zero baseline x' = 0 and path points x⁽ᵏ⁾ = αₖ·x, the conductance of
neuron y of layer L for the target logit F = f_pred is

    Cond_y = Σₖ ∂F(x⁽ᵍ⁽ᵏ⁾⁾)/∂y · (y(x⁽ᵏ⁾) − y(x⁽ᵏ⁻¹⁾)),   k = 1..n,

where the gradient is taken at g(k) = k (right end, the paper's eq. 5) or k − 1 (left end, as
Captum's ``LayerConductance``). The feature-map conductance sums each channel over space
(B×K×H×W → B×K). Completeness: Σ over all neurons ≈ F(x) − F(x'), exact as n → ∞.

Methods (the grid α₀ < … < αₙ and the gradient end):

* ``right_riemann`` — αₖ = k/n, gradient at the right end (paper, default);
* ``left_riemann`` — αₖ = k/n, gradient at the left end (Captum calls this grid ``riemann_trapezoid``);
* ``gausslegendre`` — Captum's default: the n+1 Gauss–Legendre nodes on [0, 1], left end;
* ``captum_riemann_left`` — Captum's ``riemann_left``: αₖ = k/(n+1), left end (the grid stops
  short of x, so completeness only holds approximately even for large n).

Cost: the model is split at L. Below L runs once, in inference mode, on B·n + 1 rows (every
baseline row is the same image, so it runs once); above L runs forward + backward on the B·n
gradient rows. With the right-end rule the k = n rows *are* the ordinary forward, so
:func:`conductance_forward` also returns the logits and features h of x at no extra cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from oodlib.models.base import ModelAdapter

METHODS = ("right_riemann", "left_riemann", "gausslegendre", "captum_riemann_left")


def path_alphas(method: str, n_steps: int) -> tuple[list[float], str]:
    """The n+1 path coefficients α₀..αₙ and the gradient end (``"right"`` or ``"left"``).

    Coefficients are built exactly as Captum builds them (float32 ``linspace`` / float64
    Gauss–Legendre nodes), so the matching methods reproduce its values.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be ≥ 1, got {n_steps}")
    n1 = n_steps + 1
    if method in ("right_riemann", "left_riemann"):
        alphas = torch.linspace(0, 1, n1).tolist()
    elif method == "gausslegendre":
        alphas = (0.5 * (1 + np.polynomial.legendre.leggauss(n1)[0])).tolist()
    elif method == "captum_riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n1, n1).tolist()
    else:
        raise ValueError(f"unknown conductance method {method!r}; known: {METHODS}")
    return alphas, ("right" if method == "right_riemann" else "left")


# --- splitting the model at a layer ---------------------------------------------------------


def _split_sequential(seq: nn.Sequential, target: nn.Module) -> tuple[list[nn.Module], list[nn.Module]] | None:
    """(modules up to and including ``target``, modules after it), flattening nested Sequentials."""
    for i, child in enumerate(seq):
        if child is target:
            return list(seq[: i + 1]), list(seq[i + 1 :])
        if isinstance(child, nn.Sequential):
            sub = _split_sequential(child, target)
            if sub is not None:
                return list(seq[:i]) + sub[0], sub[1] + list(seq[i + 1 :])
    return None


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer output is captured."""


@dataclass
class LayerSplit:
    """A model cut at layer L: ``lower(x) -> y`` (L's output) and ``upper(y, x) -> h``.

    For Sequential backbones (every built-in) both halves are plain Sequentials and ``upper``
    ignores ``x`` (``needs_input`` is False). Otherwise hooks are used: ``lower`` stops the forward at L, ``upper`` reruns
    the backbone on ``x`` with L's output replaced by ``y`` (correct, but the part below L runs
    again).
    """

    lower: Callable[[torch.Tensor], torch.Tensor]
    upper: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_input: bool


def split_at_layer(model: ModelAdapter, layer: str | None = None) -> LayerSplit:
    """Cut ``model``'s backbone at the named layer (default: ``model.default_layer``)."""
    module = model.layer(layer)
    if isinstance(model.backbone, nn.Sequential):
        parts = _split_sequential(model.backbone, module)
        if parts is not None:
            below, above = nn.Sequential(*parts[0]), nn.Sequential(*parts[1])
            return LayerSplit(lower=below, upper=lambda y, x: above(y), needs_input=False)

    def lower(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_m, _i, out):
            captured.append(out)
            raise _Stop

        handle = module.register_forward_hook(hook)
        try:
            model.features(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def upper(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        handle = module.register_forward_hook(lambda _m, _i, _o: y)
        try:
            return model.features(x)
        finally:
            handle.remove()

    return LayerSplit(lower=lower, upper=upper, needs_input=True)


# --- conductance ------------------------------------------------------------------------------


@dataclass
class ConductanceResult:
    """Per image (B rows): ``conductance`` (B×K feature-map conductance), ``target`` (B,) the
    class attributed (the prediction unless given), and — when computed — the ordinary forward's
    ``logits`` (B×C) and penultimate ``features`` h (B×D)."""

    conductance: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None


def _outputs_at_x(model: ModelAdapter, split: LayerSplit, x: torch.Tensor, y_x: torch.Tensor | None):
    """(features h, logits) of x without autograd, reusing L's output ``y_x`` when available."""
    with torch.no_grad():
        h = split.upper(split.lower(x) if y_x is None else y_x, x)
        return h, model.head(h)


def _conductance_chunk(
    model: ModelAdapter,
    split: LayerSplit,
    x: torch.Tensor,
    alphas: list[float],
    side: str,
    target: torch.Tensor | None,
    want_outputs: bool,
) -> ConductanceResult:
    """Conductance of one chunk of B images (all n+1 path points in one batched pass)."""
    b, n = x.shape[0], len(alphas) - 1
    zero_first = alphas[0] == 0.0
    with torch.inference_mode():
        # path points αₖ·x (zero baseline); the α = 0 rows are one shared all-zero image
        first = 1 if zero_first else 0
        pts = torch.cat([alpha * x for alpha in alphas[first:]])
        if zero_first:
            pts = torch.cat([torch.zeros_like(x[:1]), pts])
        y_flat = split.lower(pts)
        y_rest = y_flat[first:].reshape(n + 1 - first, b, *y_flat.shape[1:])
        y = torch.cat([y_flat[:1].expand(1, b, *y_flat.shape[1:]), y_rest]) if zero_first else y_rest
    grad_k = slice(1, n + 1) if side == "right" else slice(0, n)
    y_grad = y[grad_k].reshape(n * b, *y.shape[2:]).clone().requires_grad_(True)  # leaves inference mode
    x_grad = torch.cat([alpha * x for alpha in alphas[grad_k]]) if split.needs_input else None
    with torch.enable_grad():
        h_grad = split.upper(y_grad, x_grad)
        logits_grad = model.head(h_grad)
        h = logits = None
        if side == "right" and alphas[-1] == 1.0:  # the k = n rows are the ordinary forward of x
            h, logits = h_grad[-b:].detach(), logits_grad[-b:].detach()
        elif target is None or want_outputs:
            h, logits = _outputs_at_x(model, split, x, y[-1] if alphas[-1] == 1.0 else None)
        if target is None:
            target = logits.argmax(1)
        picked = logits_grad.view(n, b, -1).gather(2, target.view(1, b, 1).expand(n, b, 1))
        (grad,) = torch.autograd.grad(picked.sum(), y_grad)
    neuron = (grad.view_as(y[grad_k]) * (y[1:] - y[:-1])).sum(0)  # B×K×H×W
    fmap = neuron.flatten(2).sum(-1) if neuron.dim() > 2 else neuron
    return ConductanceResult(fmap.detach(), target, logits if want_outputs else None, h if want_outputs else None)


def _run(
    model: ModelAdapter,
    x: torch.Tensor,
    layer: str | None,
    n_steps: int,
    method: str,
    target: torch.Tensor | None,
    want_outputs: bool,
    max_points: int | None,
) -> ConductanceResult:
    if model.training:
        raise ValueError("conductance needs the model in eval mode (call model.eval())")
    alphas, side = path_alphas(method, n_steps)
    split = split_at_layer(model, layer)
    device = next(model.parameters()).device
    x = x.to(device)
    if target is not None:
        target = torch.as_tensor(target, device=device).long().view(-1)
        if len(target) != len(x):
            raise ValueError(f"target has {len(target)} entries for {len(x)} images")
    per_chunk = len(x) if max_points is None else max(1, max_points // (n_steps + 1))
    parts = [
        _conductance_chunk(
            model, split, x[i : i + per_chunk], alphas, side,
            None if target is None else target[i : i + per_chunk], want_outputs,
        )
        for i in range(0, len(x), per_chunk)
    ]
    if len(parts) == 1:
        return parts[0]
    joined = {
        name: torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None
        for name in ("conductance", "target", "logits", "features")
    }
    return ConductanceResult(**joined)


def layer_conductance(
    model: ModelAdapter,
    x: torch.Tensor,
    layer: str | None = None,
    n_steps: int = 10,
    method: str = "right_riemann",
    target: torch.Tensor | np.ndarray | None = None,
    max_points: int | None = None,
) -> torch.Tensor:
    """Feature-map conductance (B×K, float32, on the model's device) of a normalized batch x.

    Args:
        model: adapter in eval mode (its device is used).
        x: normalized inputs (B×C×H×W); the baseline is the all-zero input.
        layer: internal layer name (default ``model.default_layer``); K = its channels.
        n_steps: n, the number of path steps (n+1 points).
        method: one of :data:`METHODS` (default the paper's right-end Riemann sum).
        target: class per image (B,) — e.g. the preds of an ordinary forward already run;
            default: the model's prediction.
        max_points: cap on path points per pass (B·(n+1)); the batch is chunked to fit.
    """
    return _run(model, x, layer, n_steps, method, target, False, max_points).conductance


def conductance_forward(
    model: ModelAdapter,
    x: torch.Tensor,
    layer: str | None = None,
    n_steps: int = 10,
    method: str = "right_riemann",
    max_points: int | None = None,
) -> ConductanceResult:
    """Conductance of the predicted class plus the ordinary forward (logits, features) of x.

    With ``right_riemann`` the last path point is x itself, so this one call replaces the
    plain forward of an embed batch. Arguments as in :func:`layer_conductance`.
    """
    return _run(model, x, layer, n_steps, method, None, True, max_points)
