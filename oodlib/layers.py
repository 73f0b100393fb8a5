"""Per-image statistics of intermediate feature maps and input gradients, for the detectors that
need more than the penultimate features: Gram (row-summed Gram matrices), multi-layer Mahalanobis
(spatial means), NAC-UE (neuron states ō⊙ḡ), RankFeat (rank-1 removal) and AdaSCALE (input-gradient
perturbation). Only the reduced statistics leave this module, never whole feature maps.

Every statistic is a *request* (:class:`Gram`, :class:`LayerMeans`, :class:`NacStates`,
:class:`RankFeat`, :class:`AdaScale`); :func:`layer_pass` computes any set of requests together,
sharing the work: one hooked forward of x gives the ordinary features and logits and every
layer's map; a backward from the logits only when NAC needs ∂L/∂o (starting at its first layer);
one to the input only for AdaSCALE; then the perturbed forward (AdaSCALE) and the tops above the
rank-1-removed maps (RankFeat). Layer names are the model's (``model.layer(name)``) plus
``"avgpool"``: the pooled penultimate features h (the head's input).

A vector statistic over several layers is one column, the layers concatenated in the given order,
plus a ``<column>_sizes`` column with each layer's width (identical in every row), so a detector
knows the layout without knowing the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oodlib.models.base import ModelAdapter

POOLED = "avgpool"  # pseudo-layer: the pooled penultimate features h

_RESNET = {
    "gram": ("layer1", "layer2", "layer3", "layer4"),
    "layer_means": ("layer1", "layer2", "layer3", "layer4"),
    "nac": ("avgpool", "layer3", "layer2", "layer1"),
    "rankfeat": ("layer4", "layer3"),
}
_BLOCKS3 = {  # three conv blocks: block3 is the last (layer4's role), its pooled state is avgpool's
    "gram": ("block1", "block2", "block3"),
    "layer_means": ("block1", "block2", "block3"),
    "nac": ("avgpool", "block2", "block1"),
    "rankfeat": ("block3", "block2"),
}
#: model-aware default layers per statistic (the spec's ResNet choices; the conv blocks of the
#: 3-block CNNs by analogy). Other models need the detector's ``layers`` set explicitly.
DEFAULT_LAYERS: dict[str, dict[str, tuple[str, ...]]] = {
    "resnet18": _RESNET, "resnet50": _RESNET, "digits-cnn": _BLOCKS3, "densenet-bc-100": _BLOCKS3,
}


def default_layers(statistic: str, model_name: str, detector: str) -> tuple[str, ...]:
    """The default layers of ``statistic`` for ``model_name`` (a clear error naming ``detector``)."""
    try:
        return DEFAULT_LAYERS[model_name][statistic]
    except KeyError:
        raise ValueError(f"detector {detector!r}: no default layers for model {model_name!r} "
                         f"(defaults exist for {sorted(DEFAULT_LAYERS)}); set its `layers` hyperparameter") from None


def check_layers(model: ModelAdapter, layers, detector: str, pooled: bool = True) -> tuple[str, ...]:
    """``layers`` as a tuple, every name a layer of ``model`` (or ``avgpool`` when ``pooled``)."""
    layers = tuple(layers)
    known = list(model.layer_names) + ([POOLED] if pooled else [])
    missing = [n for n in layers if n not in known]
    if not layers or missing or len(set(layers)) != len(layers):
        raise ValueError(f"detector {detector!r}: model {model.name!r} has no layer(s) {missing} "
                         f"(or the list {list(layers)} is empty or repeats one); known: {known}")
    return layers


def layer_widths(model: ModelAdapter, layers) -> list[int]:
    """Channels (or width of ``avgpool``) of each layer's output, from one zero-image probe."""
    shapes = {}
    handles = [model.layer(n).register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, o.shape[1]))
               for n in layers if n != POOLED]
    try:
        with torch.inference_mode():
            size = model.preprocess.size
            model.features(torch.zeros(1, model.preprocess.channels, *size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return [model.feature_dim if n == POOLED else int(shapes[n]) for n in layers]


# --- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gram:
    """``gram`` [Σₗ P·Cₗ]: per layer and power p, the rows of the p-th order Gram matrix summed,
    sign·|·|^{1/p} (``G = FᵖFᵖᵀ``, Fᵖ = the map to the p, C×HW); per layer the powers in order."""

    layers: tuple[str, ...]
    powers: tuple[int, ...] = (1, 2, 3, 4, 5)
    column: ClassVar[str] = "gram"
    needs_maps: ClassVar[bool] = True

    def sizes(self, widths: list[int]) -> list[int]:
        return [len(self.powers) * w for w in widths]


@dataclass(frozen=True)
class LayerMeans:
    """``layer_means`` [Σₗ Cₗ]: the spatial mean of each layer's map."""

    layers: tuple[str, ...]
    column: ClassVar[str] = "layer_means"
    needs_maps: ClassVar[bool] = True

    def sizes(self, widths: list[int]) -> list[int]:
        return list(widths)


@dataclass(frozen=True)
class NacStates:
    """``nac`` [Σₗ Cₗ]: NAC's pre-sigmoid neuron states ō⊙ḡ, ō and ḡ the layer output and
    ∂L/∂o summed over space (the authors' ``avg_pooling`` sums), L = Σₖ −(1/C) log pₖ."""

    layers: tuple[str, ...]
    column: ClassVar[str] = "nac"
    needs_maps: ClassVar[bool] = True

    def sizes(self, widths: list[int]) -> list[int]:
        return list(widths)


@dataclass(frozen=True)
class RankFeat:
    """``rankfeat`` (scalar): T·logsumexp(mean over layers of zₗ / T), zₗ the logits after the
    rank-1 component σ₁u₁v₁ᵀ (exact, :func:`remove_rank1`) of layer l's C×HW map is removed and
    the rest of the network is run on it. Two layers (last block, the one before) = the authors'
    fusion."""

    layers: tuple[str, ...]
    temperature: float = 1.0
    needs_maps: ClassVar[bool] = True


@dataclass(frozen=True)
class AdaScale:
    """``adascale_correction`` = Σ over the top-k₁% of h of relu(h̃) and ``adascale_shift`` = Σ over
    the top-k₂% of h of |h − h̃| (AdaSCALE's Q′ = correction + λ·shift), h̃ the features of
    x̃ = x + 0.5·sign(∇ₓ max logit) on the fraction o of input elements with the smallest |∇ₓ|."""

    k1: float = 5.0
    k2: float = 1.0
    o: float = 0.05
    step: float = 0.5
    layers: ClassVar[tuple[str, ...]] = ()
    needs_maps: ClassVar[bool] = False


Request = Gram | LayerMeans | NacStates | RankFeat | AdaScale


# --- the statistics --------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> torch.Tensor:
    """B×C×(spatial…) → B×C×S (a B×D vector is B×D×1)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def gram_rows(fmap: torch.Tensor, powers) -> torch.Tensor:
    """[per p: sign·|rowsum(FᵖFᵖᵀ)|^{1/p}] concatenated, B×(P·C), float64. The row sums are
    Fᵖ(Fᵖᵀ1) — C·HW work instead of the C²·HW of the Gram matrix itself — in float32 like the
    reference implementations, each image's map first divided by a power of two (exact) that brings
    its largest |value| to ≤ 1, so that Fᵖ·ΣFᵖ cannot overflow; the scale is put back as s² after
    the p-th root."""
    f = _flat(fmap.detach()).float()
    top = f.abs().amax((1, 2), keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(top.clamp_min(1.0))))  # 1 for maps already ≤ 1
    f = f / scale
    out, fp, done = [], f, 1
    for p in powers:
        if p >= done:  # Fᵖ by repeated products (much faster than pow for the usual 1..5)
            for _ in range(p - done):
                fp = fp * f
            done = p
        else:
            fp, done = f**p, p
        g = torch.bmm(fp, fp.sum(1, keepdim=True).transpose(1, 2)).squeeze(2).double()
        out.append(g.sign() * g.abs() ** (1.0 / p) * scale.view(-1, 1).double() ** 2)
    return torch.cat(out, 1)


def remove_rank1(fmap: torch.Tensor) -> torch.Tensor:
    """The map X (per image C×HW) minus its rank-1 SVD component σ₁u₁v₁ᵀ, same shape.

    σ₁u₁v₁ᵀ = X v₁v₁ᵀ = u₁u₁ᵀX with v₁ (u₁) the top eigenvector of the smaller of XᵀX and XXᵀ,
    found by a float64 symmetric eigensolver: the same component as the authors' float32
    ``torch.linalg.svd``, twice as fast on ResNet-50 maps and closer to the float64 SVD (1e-13
    against its 1.5e-5). An image whose map is not finite gets NaN (EMBED quarantines the row)."""
    m = _flat(fmap)
    finite = torch.isfinite(m).flatten(1).all(1)
    if not finite.all():
        out = torch.full_like(m, float("nan"))
        if finite.any():
            out[finite] = _flat(remove_rank1(fmap[finite]))
        return out.view_as(fmap)
    md = m.double()
    if md.shape[2] <= md.shape[1]:
        v = torch.linalg.eigh(md.transpose(1, 2) @ md).eigenvectors[:, :, -1:]
        rest = md - (md @ v) @ v.transpose(1, 2)
    else:
        u = torch.linalg.eigh(md @ md.transpose(1, 2)).eigenvectors[:, :, -1:]
        rest = md - u @ (u.transpose(1, 2) @ md)
    return rest.to(m.dtype).view_as(fmap)


@dataclass
class PassOutput:
    """The ordinary forward (``features`` B×D, ``logits`` B×C, detached) and, per request in the
    order given, its columns as float32 NumPy arrays (B,) or (B, width)."""

    features: torch.Tensor
    logits: torch.Tensor
    columns: list[dict[str, np.ndarray]]


def layer_pass(model: ModelAdapter, x: torch.Tensor, requests) -> PassOutput:
    """Compute every request on the normalized batch x (B×C×H×W) with shared passes (see the
    module docstring). The model must be in eval mode; parameters are never touched."""
    if model.training:
        raise ValueError("layer statistics need the model in eval mode (call model.eval())")
    requests = list(requests)
    device = next(model.parameters()).device
    x = x.detach().to(device)
    order = list(model.layer_names) + [POOLED]
    maps = [n for n in dict.fromkeys(n for r in requests for n in r.layers) if n != POOLED]
    nac = list(dict.fromkeys(n for r in requests if isinstance(r, NacStates) for n in r.layers))
    input_grad = any(isinstance(r, AdaScale) for r in requests)
    # without input gradients, autograd starts at the first NAC layer (its output becomes a leaf)
    grad_from = None if input_grad or not nac else min(nac, key=order.index)
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, _i, out):
            if name == grad_from:
                out = out.detach().requires_grad_(True)
                torch.set_grad_enabled(True)  # for the rest of this forward (restored below)
            captured[name] = out
            return out
        return record

    handles = [model.layer(n).register_forward_hook(hook(n)) for n in maps]
    try:
        # set_grad_enabled restores the caller's mode on exit (the hooks may switch it on)
        with torch.inference_mode() if not (input_grad or nac) else torch.set_grad_enabled(input_grad):
            x_in = x.clone().requires_grad_(True) if input_grad else x
            h = model.features(x_in)
            if grad_from == POOLED:
                h = h.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            logits = model.head(h)
            captured[POOLED] = h
            grads = {}
            if nac:
                loss = -F.log_softmax(logits, 1).mean(1).sum()
                grads = dict(zip(nac, torch.autograd.grad(loss, [captured[n] for n in nac], retain_graph=input_grad)))
            x_grad = None
            if input_grad:
                top = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                (x_grad,) = torch.autograd.grad(top, x_in)
    finally:
        for handle in handles:
            handle.remove()
    h, logits = h.detach(), logits.detach()
    columns = []
    with torch.inference_mode():
        for r in requests:
            columns.append(_columns(model, r, x, h, logits, {n: captured[n].detach() for n in r.layers}, grads, x_grad))
    return PassOutput(h, logits, columns)


def _concat(parts: list[torch.Tensor], column: str, sizes: list[int]) -> dict[str, np.ndarray]:
    values = torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1).float().cpu().numpy()
    return {column: values, f"{column}_sizes": np.tile(np.asarray(sizes, np.float32), (len(values), 1))}


def _columns(model, r, x, h, logits, maps, grads, x_grad) -> dict[str, np.ndarray]:
    if isinstance(r, Gram):
        parts = [gram_rows(maps[n], r.powers) for n in r.layers]
        return _concat(parts, r.column, [p.shape[1] for p in parts])
    if isinstance(r, LayerMeans):
        parts = [_flat(maps[n]).double().mean(2) for n in r.layers]
        return _concat(parts, r.column, [p.shape[1] for p in parts])
    if isinstance(r, NacStates):
        parts = [_flat(maps[n]).sum(2) * _flat(grads[n].detach()).sum(2) for n in r.layers]
        return _concat(parts, r.column, [p.shape[1] for p in parts])
    if isinstance(r, RankFeat):
        return {"rankfeat": rankfeat_from_maps(model, x, maps, r).float().cpu().numpy()}
    if isinstance(r, AdaScale):
        return adascale_terms_from_grad(model, x, h, x_grad, r)
    raise TypeError(f"unknown layer statistic {r!r}")


def rankfeat_from_maps(model: ModelAdapter, x: torch.Tensor, maps: dict[str, torch.Tensor], r: RankFeat) -> torch.Tensor:
    """RankFeat's fused energy from the captured maps (inference mode)."""
    from oodlib.errors.conductance import split_at_layer

    z = []
    for name in r.layers:
        if maps[name].dim() < 3:
            raise ValueError(f"RankFeat: layer {name!r} has no spatial map (shape {tuple(maps[name].shape)})")
        split = split_at_layer(model, name)
        z.append(model.head(split.upper(remove_rank1(maps[name]), x)).double())
    fused = torch.stack(z).mean(0)
    return r.temperature * torch.logsumexp(fused / r.temperature, 1)


def perturb(x: torch.Tensor, grad: torch.Tensor, o: float, step: float = 0.5) -> torch.Tensor:
    """x + step·sign(grad) on the ⌊o·CHW⌋ input elements of each image with the smallest |grad|."""
    b = x.shape[0]
    flat = grad.abs().reshape(b, -1)
    k = int(flat.shape[1] * o)
    mask = torch.zeros_like(flat, dtype=torch.uint8)
    mask.scatter_(1, torch.topk(flat, k, dim=1, largest=False).indices, 1)
    return x + grad.sign() * mask.view_as(x) * step


def inference_features(model: ModelAdapter, x: torch.Tensor) -> torch.Tensor:
    """h of x without autograd: for a Sequential backbone the cached BN-folded (MKLDNN on CPU)
    copy of everything below the last named layer (:func:`oodlib.errors.conductance.inference_trunk`,
    exact up to float rounding, ~30% faster on CPU), else ``model.features``."""
    from oodlib.errors.conductance import split_at_layer

    if not isinstance(model.backbone, torch.nn.Sequential):
        return model.features(x)
    split = split_at_layer(model, model.layer_names[-1], example=x)
    return split.upper(split.lower(x), x)


def adascale_terms_from_grad(model, x, h, x_grad, r: AdaScale) -> dict[str, np.ndarray]:
    """AdaSCALE's two per-image terms from h and ∇ₓ max logit (inference mode)."""
    h_t = inference_features(model, perturb(x, x_grad, r.o, r.step))
    d = h.shape[1]
    k1, k2 = int(d * r.k1 / 100), int(d * r.k2 / 100)
    top1 = torch.topk(h, k1, dim=1).indices
    top2 = torch.topk(h, k2, dim=1).indices
    correction = torch.relu(h_t).gather(1, top1).double().sum(1)
    shift = (h - h_t).abs().gather(1, top2).double().sum(1)
    return {"adascale_correction": correction.float().cpu().numpy(), "adascale_shift": shift.float().cpu().numpy()}


# --- one statistic at a time (library use; EMBED computes them together) -----------------------


def gram_statistics(model: ModelAdapter, x: torch.Tensor, layers, powers=(1, 2, 3, 4, 5)) -> dict[str, np.ndarray]:
    return layer_pass(model, x, [Gram(tuple(layers), tuple(powers))]).columns[0]


def layer_means(model: ModelAdapter, x: torch.Tensor, layers) -> dict[str, np.ndarray]:
    return layer_pass(model, x, [LayerMeans(tuple(layers))]).columns[0]


def nac_states(model: ModelAdapter, x: torch.Tensor, layers) -> dict[str, np.ndarray]:
    return layer_pass(model, x, [NacStates(tuple(layers))]).columns[0]


def rankfeat_score(model: ModelAdapter, x: torch.Tensor, layers, temperature: float = 1.0) -> np.ndarray:
    return layer_pass(model, x, [RankFeat(tuple(layers), float(temperature))]).columns[0]["rankfeat"]


def adascale_terms(model: ModelAdapter, x: torch.Tensor, k1=5.0, k2=1.0, o=0.05) -> dict[str, np.ndarray]:
    return layer_pass(model, x, [AdaScale(float(k1), float(k2), float(o))]).columns[0]
