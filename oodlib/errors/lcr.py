"""Label change rate (LCR) over model mutants, batched per mutant, with SPRT early stopping.

LCR(x) = |{m : m(x) ≠ f(x)}| / |mutants used|, f(x) the original model's prediction.
Execution: mutant m is applied in place, runs over the whole batch, is reverted; the flip
matrix F (B×M, F[i, m] = mutant m changes input i's label) is filled one column at a time.
A mutant runs only from the first stage it changes: the original model's activations before it
are computed once per batch and reused (:func:`label_change_rate`).

SPRT (Wang et al.; ``specs/conductance_lcr.md``): per input, over the mutants in their fixed
order, with p1 = τ + 0.1τ, p0 = τ − 0.1τ, after n mutants with c flips

    log-ratio = c·log(p1/p0) + (n − c)·log((1 − p1)/(1 − p0));

stop "wrong" when ≥ log((1 − β)/α), stop "correct" when ≤ log(β/(1 − α)) (α = β = 0.05). The
rule is checked after **every** mutant. Inputs that decided stop being evaluated (the batch is
compacted to the undecided rows), and the batch stops once every input decided; an input that
never decides uses every mutant. ``lcr`` is then c / n at the input's stop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from oodlib.errors.mutants import Patch, applied
from oodlib.models.base import ModelAdapter

WRONG, CORRECT, UNDECIDED = 1, 0, -1


@dataclass(frozen=True)
class SPRT:
    """Sequential probability ratio test on label flips; ``tau`` ∈ (0, 1/1.1)."""

    tau: float
    alpha: float = 0.05
    beta: float = 0.05
    relax: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.tau * (1 + self.relax) < 1.0:
            raise ValueError(f"SPRT needs 0 < τ(1 + {self.relax}) < 1, got τ = {self.tau}")

    @property
    def p0(self) -> float:
        return self.tau * (1 - self.relax)

    @property
    def p1(self) -> float:
        return self.tau * (1 + self.relax)

    @property
    def upper(self) -> float:
        """Stop "wrong" at log-ratio ≥ log((1 − β)/α)."""
        return float(np.log((1 - self.beta) / self.alpha))

    @property
    def lower(self) -> float:
        """Stop "correct" at log-ratio ≤ log(β/(1 − α))."""
        return float(np.log(self.beta / (1 - self.alpha)))

    def log_ratio(self, c: np.ndarray | torch.Tensor, n: int | np.ndarray) -> np.ndarray | torch.Tensor:
        """c·log(p1/p0) + (n − c)·log((1 − p1)/(1 − p0)) for c flips in n mutants."""
        return c * np.log(self.p1 / self.p0) + (n - c) * np.log((1 - self.p1) / (1 - self.p0))

    def decide(self, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Post-hoc SPRT on a full flip matrix (B×M bool): (decision (B,) int8, used (B,) int).

        decision is :data:`WRONG`, :data:`CORRECT` or :data:`UNDECIDED`; ``used`` is the number
        of mutants at the stop (M when undecided).
        """
        flips = np.asarray(flips, bool)
        n = np.arange(1, flips.shape[1] + 1)
        ratio = self.log_ratio(np.cumsum(flips, axis=1), n)
        hit = (ratio >= self.upper) | (ratio <= self.lower)
        decided = hit.any(axis=1)
        first = np.where(decided, hit.argmax(axis=1), flips.shape[1] - 1)
        decision = np.where(decided, np.where(ratio[np.arange(len(flips)), first] >= self.upper, WRONG, CORRECT), UNDECIDED)
        return decision.astype(np.int8), first + 1

    def lcr(self, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The LCR the early-stopped run would give, from a full flip matrix (B×M bool):
        (flips among the mutants used / mutants used (B,) float32, used (B,))."""
        flips = np.asarray(flips, bool)
        _, used = self.decide(flips)
        counted = np.arange(flips.shape[1])[None, :] < used[:, None]
        return ((flips & counted).sum(1) / used).astype(np.float32), used


def fit_sprt_tau(lcr_correct: np.ndarray, n_mutants: int, confidence: float = 0.99, band: str = "quantile",
                 relax: float = 0.1) -> float:
    """τ from the LCR of *correct* validation predictions (N,), kept inside the SPRT's range.

    ``band="quantile"`` (default): the empirical ``confidence``-quantile — ``confidence`` of the
    correct validation predictions have LCR ≤ τ. LCR of correct predictions is far from normal
    (mostly 0 with a long tail), so a normal band (mean + z·std) falls well short of the 99% it
    claims. ``band="mean_ci"``: mean + z_((1+c)/2)·std/√N, the upper end of the confidence
    interval of the mean (Wang et al.'s code, "avg + 99% confidence"); it sits at the typical
    correct LCR, so a never-flipping input needs ≈ 14.7/τ mutants to be decided.

    τ is floored at one flip in ``n_mutants`` (when no correct prediction ever flips, τ = 0 and
    the test is undefined) and capped below 1/(1 + relax) (p1 = τ(1 + relax) must stay < 1).
    """
    x = np.asarray(lcr_correct, np.float64)
    if len(x) < 2:
        raise ValueError("fit_sprt_tau needs at least two correct validation predictions")
    if band == "quantile":
        tau = np.quantile(x, confidence)
    elif band == "mean_ci":
        from scipy.stats import norm  # 0.6 s to import: only where this band is used

        tau = x.mean() + norm.ppf((1 + confidence) / 2) * x.std(ddof=1) / np.sqrt(len(x))
    else:
        raise ValueError(f"unknown band {band!r}; known: quantile, mean_ci")
    return float(np.clip(tau, 1.0 / n_mutants, np.nextafter(1.0 / (1 + relax), 0.0)))


@dataclass
class LCRResult:
    """Per input (B rows): ``lcr`` (float32), ``used`` mutants (int16), ``decision`` (int8, SPRT
    only, else None), and ``flips`` (B×M bool; only ``flips[i, :used[i]]`` were evaluated)."""

    flips: np.ndarray
    lcr: np.ndarray
    used: np.ndarray
    decision: np.ndarray | None = None


def forward_stages(model: nn.Module) -> list[nn.Module]:
    """``model``'s forward as a chain of modules (their composition is the forward): for a
    model with a ``backbone`` ``nn.Sequential`` and a ``head`` (:class:`ModelAdapter`), the
    backbone's modules with nested ``nn.Sequential`` flattened, then the head; for an
    ``nn.Sequential``, its flattened modules; otherwise ``[model]`` (one stage)."""

    def flat(seq: nn.Sequential) -> list[nn.Module]:
        return [s for c in seq for s in (flat(c) if isinstance(c, nn.Sequential) else [c])]

    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if isinstance(backbone, nn.Sequential) and isinstance(head, nn.Module) and type(model).forward is ModelAdapter.forward:
        return [*flat(backbone), head]
    return flat(model) if isinstance(model, nn.Sequential) else [model]


def first_mutated_stage(stages: list[nn.Module], patches: list[Patch]) -> int:
    """Index of the first stage holding a parameter that ``patches`` change (0 when unknown)."""
    owner = {t.data_ptr(): i for i, st in enumerate(stages) for t in st.parameters()}
    return min((owner.get(p.param.data_ptr(), 0) for p in patches), default=0)


def label_change_rate(
    model: nn.Module,
    x: torch.Tensor,
    patches: list[list[Patch]],
    preds: torch.Tensor | np.ndarray | None = None,
    sprt: SPRT | None = None,
    batch_size: int | None = None,
) -> LCRResult:
    """LCR of a normalized batch ``x`` (B×…) over mutants given as patches (one list per mutant,
    e.g. ``MutantSet.patches(model)``), each mutant run over the whole batch.

    ``preds``: the original model's predictions (B,) from the ordinary forward (computed when
    None). ``sprt``: early stop (see module doc); None runs every mutant on every input.
    ``batch_size``: rows per pass (None = the whole batch); chunks are independent (the SPRT
    is per input; a chunk stops once all of its inputs decided).

    Prefix reuse: the model runs as a chain of stages (:func:`forward_stages`); the stages
    before a mutant's first mutated parameter compute what the original model computes, so the
    original's activations at those boundaries are kept once per chunk and each mutant runs
    only from its first mutated stage on. The flips are those of full mutant forwards.
    """
    if not patches:
        raise ValueError("label_change_rate needs at least one mutant")
    device = next(model.parameters()).device
    x = x.to(device)
    preds = None if preds is None else torch.as_tensor(preds, device=device).view(-1)
    stages = forward_stages(model)
    starts = [first_mutated_stage(stages, p) for p in patches]
    step = len(x) if batch_size is None else batch_size
    parts = [_lcr_chunk(stages, starts, x[i : i + step], None if preds is None else preds[i : i + step], patches, sprt)
             for i in range(0, len(x), step)]
    flips, used, decision = (torch.cat(t) for t in zip(*parts))
    counted = torch.arange(len(patches), device=device)[None, :] < used[:, None]
    lcr = (flips & counted).sum(1).double() / used.clamp(min=1)
    return LCRResult(
        flips=flips.cpu().numpy(),
        lcr=lcr.float().cpu().numpy(),
        used=used.to(torch.int16).cpu().numpy(),
        decision=decision.cpu().numpy() if sprt is not None else None,
    )


def _run(stages: list[nn.Module], start: int, h: torch.Tensor) -> torch.Tensor:
    for stage in stages[start:]:
        h = stage(h)
    return h


@torch.inference_mode()
def _lcr_chunk(
    stages: list[nn.Module], starts: list[int], x: torch.Tensor, preds: torch.Tensor | None,
    patches: list[list[Patch]], sprt: SPRT | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of :func:`label_change_rate`: (flips B×M bool, used (B,) long, decision (B,) int8)."""
    keep = set(starts) - {0}
    # the original forward, as far as needed: its activations where mutants start, its predictions
    last = len(stages) if preds is None else max(keep, default=0)
    cache, h = {0: x}, x
    for i, stage in enumerate(stages[:last]):
        h = stage(h)
        if i + 1 in keep:
            cache[i + 1] = h.clone()  # a clone: an in-place stage i + 1 must not change it
    if preds is None:
        preds = h.argmax(1)
    b, m_total = len(x), len(patches)
    flips = torch.zeros(b, m_total, dtype=torch.bool, device=x.device)
    used = torch.full((b,), m_total, dtype=torch.long, device=x.device)
    decision = torch.full((b,), UNDECIDED, dtype=torch.int8, device=x.device)
    active, preds_active = None, preds  # None: every row still runs
    for m, mutant in enumerate(patches):
        h = cache[starts[m]]
        h = h[active] if active is not None else h.clone() if starts[m] else h
        with applied(mutant):
            flips[slice(None) if active is None else active, m] = _run(stages, starts[m], h).argmax(1) != preds_active
        if sprt is None:
            continue
        rows = torch.arange(b, device=x.device) if active is None else active
        ratio = sprt.log_ratio(flips[rows, : m + 1].sum(1).double(), m + 1)
        wrong, correct = ratio >= sprt.upper, ratio <= sprt.lower
        stop = wrong | correct
        if stop.any():
            decision[rows[wrong]], decision[rows[correct]] = WRONG, CORRECT
            used[rows[stop]] = m + 1
            active = rows[~stop]
            if len(active) == 0:
                break
            preds_active = preds[active]
    return flips, used, decision
