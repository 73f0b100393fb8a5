"""Relevance rules for one layer: LRP-ε, LRP-αβ, z^β (input), RAP and Attribution Equilibrium.

Shapes: conv relevance is B×C×H×W, linear relevance B×D; every rule works on whole batches with
explicit (transposed) convolutions — all normalizations are per sample (sums over non-batch dims).
Notation as in the spec: z_ij = x_i w_ij, z⁺ = max(z, 0), z⁻ = min(z, 0).

Conventions:
* LRP rules use BatchNorm folded into the preceding conv and include the bias in the
  denominators, as zennit does (``bias=False`` drops it, which makes them conservative).
  Denominators are stabilized like zennit: ``z + ε·sign(z)`` with sign(0) = +1.
* RAP and AE follow the authors' code: raw conv weights, BatchNorm as identity, conv biases
  ignored, divisions by zero give zero (:func:`safe_div`).
"""
from __future__ import annotations

import torch

from oodlib.attribution.program import ConvCache, ConvOp, LinearOp, UnsupportedLayerError


def safe_div(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The authors' ``safe_divide``: ``a / (b + eps)``, 0 where ``b == 0`` (where ``b + eps == 0``
    they divide by ``eps``). Their code uses eps = 1e-9; eps = 0 (oodlib's default) is the exact
    division the spec states. The one safe division of the package, for both conventions.

    eps = 0 takes one pass: for finite ``a`` the quotients of ``b == 0`` are exactly the non-finite
    ones (±inf, NaN), set to 0 in place (a quotient beyond the float range would read 0 as well).
    """
    if not eps:
        return torch.div(a, b).nan_to_num_(0.0, 0.0, 0.0)
    den = b + eps
    return (a / den.masked_fill_(den == 0, eps)).masked_fill_(b == 0, 0.0)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabilizer: ``z + eps·sign(z)`` with sign(0) taken as +1."""
    return z + eps * ((z == 0).to(z) + z.sign())


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


def _psum(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum, broadcastable against ``t``."""
    return t.sum(_dims(t), keepdim=True)


def _check_nonnegative(x: torch.Tensor, name: str) -> None:
    if bool((x < 0).any()):
        raise ValueError(f"layer {name!r}: this rule needs non-negative inputs (post-ReLU); got negative values")


def zbeta(op: ConvOp, x: torch.Tensor, w: torch.Tensor, R: torch.Tensor, divide) -> torch.Tensor:
    """z^β input rule (RAP eq. 10) with l = min, h = max of each image (over C, H, W).

    R_i = Σ_j (x_i w_ij − l w⁺_ij − h w⁻_ij) / Σ_i(…) · R_j; one convolution and one transposed
    convolution over the stacked inputs [x, l, h]. ``divide(a, b)`` is the stabilized division.
    """
    low = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = op.conv2d(torch.cat([x, low, high], 1), torch.cat([w, -wp, -wn], 1))
    s = divide(R, z)
    g = op.conv2d_t(s, torch.cat([w, wp, wn], 1), torch.Size([x.shape[0], 3 * x.shape[1], *x.shape[2:]]))
    c = x.shape[1]
    return x * g[:, :c] - low * g[:, c : 2 * c] - high * g[:, 2 * c :]


def shift_nonzero(C: torch.Tensor, R: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """RAP uniform shifting, in place: subtract (ΣC − ΣR)/#nonzero(C) from every non-zero entry of C
    (per sample; the count divided with :func:`safe_div`, ``eps`` its stabilizer)."""
    dims = _dims(C)
    nz = torch.ne(C, 0, out=torch.empty_like(C))  # a float mask and ``addcmul_``: faster on CPU than a bool mask
    k = safe_div(C.sum(dims, keepdim=True) - R.sum(dims, keepdim=True), nz.sum(dims, keepdim=True), eps)
    return C.addcmul_(nz, k, value=-1.0)


class _LinearConv:
    """Forward ``fwd(x, w)`` and transposed ``bwd(s, w)`` maps of a linear or conv op."""

    def __init__(self, op: ConvOp | LinearOp, x: torch.Tensor):
        self.op, self.shape = op, x.shape

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.op.conv2d(x, w) if isinstance(self.op, ConvOp) else x @ w.T

    def bwd(self, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.op.conv2d_t(s, w, self.shape) if isinstance(self.op, ConvOp) else s @ w

    @staticmethod
    def bias(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return b.view(1, -1, *([1] * (like.ndim - 2)))


class LRPEpsilon:
    """LRP-ε (RAP eq. 3): R_i = Σ_j z_ij / (z_j + b_j + ε·sign) · R_j. z^β at the input layer."""

    split = False

    def __init__(self, epsilon: float = 1e-6, bias: bool = True, stabilizer: float = 1e-6):
        self.epsilon, self.bias, self.stabilizer = epsilon, bias, stabilizer

    def _apply(self, op, x, w, b, R):
        f = _LinearConv(op, x)
        z = f.fwd(x, w) + (f.bias(b, R) if self.bias else 0)
        return x * f.bwd(R / stabilize(z, self.epsilon), w)

    def linear(self, op: LinearOp, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return self._apply(op, x, *op.params(), R)

    def head(self, op: LinearOp, x: torch.Tensor, R: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.linear(op, x, R)

    def conv(self, op: ConvOp, cache: ConvCache, R: torch.Tensor) -> torch.Tensor:
        return self._apply(op, cache.x, *op.folded(), R)

    def input_conv(self, op: ConvOp, cache: ConvCache, R: torch.Tensor) -> torch.Tensor:
        return zbeta(op, cache.x, op.folded()[0], R, lambda a, b: a / stabilize(b, self.stabilizer))


class LRPAlphaBeta(LRPEpsilon):
    """LRP-αβ (RAP eq. 4), α − β = 1, as zennit: positive part x⁺w⁺ + x⁻w⁻ (+b⁺), negative part
    x⁺w⁻ + x⁻w⁺ (+b⁻), each normalized separately; R = α·R⁺-part − β·R⁻-part."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, bias: bool = True, stabilizer: float = 1e-6):
        if abs(alpha - beta - 1.0) > 1e-12 or alpha < 0 or beta < 0:
            raise ValueError(f"LRP-αβ needs α − β = 1 and α, β ≥ 0; got α={alpha}, β={beta}")
        super().__init__(bias=bias, stabilizer=stabilizer)
        self.alpha, self.beta = alpha, beta

    def _apply(self, op, x, w, b, R):
        f = _LinearConv(op, x)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        bp, bn = (f.bias(b.clamp(min=0), R), f.bias(b.clamp(max=0), R)) if self.bias else (0, 0)
        sp = R / stabilize(f.fwd(xp, wp) + f.fwd(xn, wn) + bp, self.stabilizer)
        sn = R / stabilize(f.fwd(xp, wn) + f.fwd(xn, wp) + bn, self.stabilizer)
        pos = xp * f.bwd(sp, wp) + xn * f.bwd(sp, wn)
        neg = xp * f.bwd(sn, wn) + xn * f.bwd(sn, wp)
        return self.alpha * pos - self.beta * neg


class RAP:
    """Relative attributing propagation (Nam et al., AAAI 2020), as the authors implement it.

    * head (first propagation): contributions C_i = x_i w_ti plus the bias split between positive
      and negative contributors by their shares, then absolute influence normalization
      R_i = |C_i| · ΣC / Σ|C| (eq. 5–6).
    * hidden linear / conv (eq. 7–9, inputs x ≥ 0): R⁺ by the z⁺ rule plus the share
      R⁺·|z⁻|/(z⁺+|z⁻|) through |w⁻|; R⁻ likewise, its z-rule part through w⁺ for linear layers
      and through |w⁻| for conv layers; then uniform shifting (:func:`shift_nonzero`). The authors'
      second branch (inputs x⁻) is zero for x ≥ 0 and skipped. Conv rules share one stacked
      transposed convolution for the terms with the same weights.
    * input layer: z^β.

    ``eps``: the division stabilizer of every :func:`safe_div` (also in the engine's residual and
    pooling steps): 0 = exact divisions (default, the spec's convention); 1e-9 = the authors' code.
    """

    split = True

    def __init__(self, eps: float = 0.0):
        self.eps = eps

    def head(self, op: LinearOp, x: torch.Tensor, R: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w, b = op.params()
        wt, bt = w[target], b[target][:, None]
        xp, eps = x.clamp(min=0), self.eps
        z = x * wt
        zpp, zpn = xp * wt.clamp(min=0), xp * wt.clamp(max=0)
        pos, neg = z.clamp(min=0).sum(1, keepdim=True), z.clamp(max=0).sum(1, keepdim=True)
        b_pos, b_neg = bt * safe_div(pos, pos + neg, eps), bt * safe_div(neg, pos + neg, eps)
        C = z + zpp * safe_div(b_pos, zpp.sum(1, keepdim=True), eps) + zpn * safe_div(b_neg, zpn.sum(1, keepdim=True), eps)
        return C.abs() * safe_div(C.sum(1, keepdim=True), C.abs().sum(1, keepdim=True), eps)

    def linear(self, op: LinearOp, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        _check_nonnegative(x, op.name)
        w = op.params()[0]
        wp, wn = w.clamp(min=0), -w.clamp(max=0)
        zp, zn = x @ wp.T, x @ wn.T
        C = x * (safe_div(R, zp, self.eps) @ wp + safe_div(R, zp + zn, self.eps) @ wn)
        return shift_nonzero(C, R, self.eps)

    def signals(self, R: torch.Tensor, zp: torch.Tensor, zn: torch.Tensor) -> torch.Tensor:
        """S = [S⁺ ; S⁻] (B×2Co×h×w) for the stacked weights [w⁺; |w⁻|], Z = Z⁺ + |Z⁻|:
        S⁺ = R⁺/Z⁺ · g and S⁻ = R⁻/|Z⁻| · g + R/Z · h, g = Z/(Z+ε), h = |Z⁻|/(|Z⁻|+ε) — the authors'
        four terms R⁺·one/Z⁺, (R⁻·one + R⁺·share + R⁻·share)/|Z⁻| with one = Z/Z and
        share = |Z⁻|/Z, every division stabilized; for ε = 0, g = h = 1. (Where |Z⁻| = 0 and ε = 0,
        S⁻ keeps R/Z where the authors' code has 0: every x_i·|w⁻_ij| feeding that output is 0, so
        the contributions C are the same.)"""
        eps = self.eps
        Z = zp + zn
        sp = safe_div(R.clamp(min=0), zp, eps)
        sn = safe_div(R.clamp(max=0), zn, eps)
        r = safe_div(R, Z, eps)
        if eps:
            g = Z / (Z + eps)
            sp.mul_(g)
            sn.mul_(g)
            r.mul_(zn / (zn + eps))
        return torch.cat([sp, sn.add_(r)], 1)

    def conv(self, op: ConvOp, cache: ConvCache, R: torch.Tensor) -> torch.Tensor:
        """C = x ⊙ convᵀ(S, [w⁺; |w⁻|]) — one transposed convolution for the four terms (they share
        two denominators and two weights) — then uniform shifting."""
        if not op.nonneg_input:
            raise UnsupportedLayerError(f"layer {op.name!r}: RAP needs non-negative (post-ReLU) conv inputs")
        x = cache.x
        C = op.conv2d_t(self.signals(R, cache.zp, cache.zn), cache.w, x.shape).mul_(x)
        return shift_nonzero(C, R, self.eps)

    def input_conv(self, op: ConvOp, cache: ConvCache, R: torch.Tensor) -> torch.Tensor:
        return zbeta(op, cache.x, op.weight, R, lambda a, b: safe_div(a, b, self.eps))


AE_TERMS = ("C", "A", "U", "shift")


class AttributionEquilibrium:
    """Attribution Equilibrium propagation through the feature-extraction convolutions.

    Per conv layer with output relevance R (B×Co×h×w): P = R⁺, N = R⁻ rescaled to masses +τ and −τ
    (eq. 6; τ = |ΣG| of the normalized initial map = 1); then with |w|:
    C = J(x, |w|, γP′) + J(x, |w|, N′) (eq. 8), A = J(α, |w|, P′) (eq. 10), U = J(β, |w|, N′)
    (eq. 11), α = 1[x>0], β = 1[x≤0], Ψ = τ/Σα on active inputs (eq. 12);
    R_next = C + A + U − Ψ (eq. 13), so ΣR_next = (γ−2)·τ. 1×1 convolutions: γ = 1, no shift.
    J(x, w, R)_i = Σ_j x_i w_ij / Σ_i' x_i' w_i'j · R_j. ``terms`` switches C/A/U/shift for the
    ablation. Input layer: z^β.
    """

    split = False

    def __init__(self, gamma: float = 1.0, terms: tuple[str, ...] = AE_TERMS, tau: float = 1.0):
        if not 1.0 <= gamma <= 2.0:
            raise ValueError(f"AE needs 1 ≤ γ ≤ 2; got {gamma}")
        unknown = set(terms) - set(AE_TERMS)
        if unknown or not terms:
            raise ValueError(f"AE terms must be a non-empty subset of {AE_TERMS}; got {terms}")
        self.gamma, self.terms, self.tau = gamma, tuple(terms), tau

    def conv(self, op: ConvOp, cache: ConvCache, R: torch.Tensor) -> torch.Tensor:
        x, w = cache.x, op.weight.abs()
        gamma = 1.0 if op.pointwise else self.gamma
        P, N = R.clamp(min=0), R.clamp(max=0)
        P = P * safe_div(torch.full_like(_psum(P), self.tau), _psum(P))
        N = N * safe_div(torch.full_like(_psum(N), self.tau), -_psum(N))
        alpha = (x > 0).to(x)
        out = torch.zeros_like(x)
        if "C" in self.terms:
            out = out + x * op.conv2d_t(safe_div(gamma * P + N, op.conv2d(x, w)), w, x.shape)
        if "A" in self.terms:
            out = out + alpha * op.conv2d_t(safe_div(P, op.conv2d(alpha, w)), w, x.shape)
        if "U" in self.terms:
            beta = 1.0 - alpha
            out = out + beta * op.conv2d_t(safe_div(N, op.conv2d(beta, w)), w, x.shape)
        if "shift" in self.terms and not op.pointwise:
            out = out - alpha * safe_div(torch.full_like(_psum(alpha), self.tau), _psum(alpha))
        return out

    def input_conv(self, op: ConvOp, cache: ConvCache, R: torch.Tensor) -> torch.Tensor:
        return zbeta(op, cache.x, op.weight, R, safe_div)
