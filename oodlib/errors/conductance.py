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

The part below L never needs gradients, so it runs as an inference copy (:func:`inference_trunk`):
eval-mode BatchNorm folded into the preceding convolution and, on CPU, MKLDNN tensors (both exact
up to float rounding; the copy is cached per model and layer and rebuilt when a weight changes
in place).
"""
from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

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


@dataclass
class _Trunk:
    """A cached inference runner with the weights it was built from (``tensors``: the source
    module's parameters and buffers; ``pointers``, ``values``, ``versions``: their storage,
    contents and in-place version counters then)."""

    runner: Callable[[torch.Tensor], torch.Tensor]
    tensors: list[torch.Tensor]
    pointers: list[int]
    values: list[torch.Tensor]
    versions: list[int]

    def still_valid(self, tensors: list[torch.Tensor]) -> bool:
        """True when ``tensors`` hold the values the runner was built from. Versions are
        checked first; a changed version (a mutant applied and reverted) compares contents."""
        if len(tensors) != len(self.tensors) or any(
            a is not b or a.data_ptr() != ptr for a, b, ptr in zip(tensors, self.tensors, self.pointers)
        ):
            return False
        versions = [t._version for t in tensors]
        if versions == self.versions:
            return True
        if all(torch.equal(t, v) for t, v in zip(tensors, self.values)):
            self.versions = versions
            return True
        return False


# inference runners of the part below a layer: model -> {layer name: _Trunk}
_TRUNKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mkldnn_runner(trunk: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``trunk`` run on oneDNN (MKLDNN) tensors: the blocked layout is kept between layers
    instead of being reordered around every convolution (CPU, float32)."""
    return lambda x: trunk(x.contiguous().to_mkldnn()).to_dense()


def inference_trunk(model: ModelAdapter, name: str, below: nn.Sequential, example: torch.Tensor) -> Callable:
    """An inference-only runner for ``below`` (the modules up to layer ``name``): a copy with
    BatchNorm folded into the preceding conv (``torch.fx`` pattern fusion, eval statistics), run
    on MKLDNN tensors on CPU when every op supports them (checked on ``example``, a batch of
    inputs) and else as is. Cached per (model, layer); rebuilt when a weight of ``below`` changes
    in place (it keeps a copy of ``below``'s weights to tell an exact restore from a change).
    Without an fx trace it runs an unfolded copy (folding is only a speed-up)."""
    tensors = [*below.parameters(), *below.buffers()]
    cached = _TRUNKS.setdefault(model, {}).get(name)
    if cached is not None and cached.still_valid(tensors):
        return cached.runner
    try:
        trunk = fuse(below)  # a deep copy; ``below`` keeps its BatchNorms
    except Exception:  # noqa: BLE001 -- fx raises assorted errors on untraceable control flow
        trunk = copy.deepcopy(below)
    trunk.requires_grad_(False)
    runner: Callable = trunk
    if example.device.type == "cpu" and example.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        probe = example[:2]
        with torch.inference_mode():
            try:
                ok = torch.allclose(_mkldnn_runner(trunk)(probe), trunk(probe), rtol=1e-4, atol=1e-5)
            except RuntimeError:  # an op without an MKLDNN kernel
                ok = False
        if ok:
            runner = _mkldnn_runner(trunk)
    _TRUNKS[model][name] = _Trunk(
        runner, tensors, [t.data_ptr() for t in tensors], [t.detach().clone() for t in tensors], [t._version for t in tensors]
    )
    return runner


def split_at_layer(model: ModelAdapter, layer: str | None = None, example: torch.Tensor | None = None) -> LayerSplit:
    """Cut ``model``'s backbone at the named layer (default: ``model.default_layer``).

    For Sequential backbones ``upper`` is the model's own modules above the layer and ``lower``
    the ones below it, or — given ``example`` inputs — the cached inference runner of
    :func:`inference_trunk` (then use ``lower`` without autograd only).
    """
    module = model.layer(layer)
    if isinstance(model.backbone, nn.Sequential):
        parts = _split_sequential(model.backbone, module)
        if parts is not None:
            below = nn.Sequential(*parts[0])
            lower = (
                below if example is None else inference_trunk(model, layer or model.default_layer, below, example)
            )
            above = nn.Sequential(*parts[1])
            return LayerSplit(lower=lower, upper=lambda y, x: above(y), needs_input=False)

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


def _path_points(x: torch.Tensor, alphas: list[float], extra_zero_rows: int) -> torch.Tensor:
    """[0 (``extra_zero_rows`` rows); α₁·x; α₂·x; …] as one (z + len(alphas)·B)×… tensor."""
    b, rest = x.shape[0], x.shape[1:]
    pts = torch.empty((extra_zero_rows + len(alphas) * b, *rest), dtype=x.dtype, device=x.device)
    pts[:extra_zero_rows] = 0
    a = torch.tensor(alphas, dtype=x.dtype, device=x.device).view(-1, *[1] * x.dim())
    torch.mul(a, x, out=pts[extra_zero_rows:].view(len(alphas), b, *rest))
    return pts


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
        # path points αₖ·x (zero baseline), written by one broadcast multiply; the α = 0 rows
        # are one shared all-zero image
        first = 1 if zero_first else 0
        pts = _path_points(x, alphas[first:], extra_zero_rows=first)
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
    device = next(model.parameters()).device
    x = x.to(device)
    split = split_at_layer(model, layer, example=x)
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
