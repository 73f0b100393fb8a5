"""Label change rate (LCR) over model mutants, batched per mutant, with SPRT early stopping.

LCR(x) = |{m : m(x) ≠ f(x)}| / |mutants used|, f(x) the original model's prediction.
Execution: mutant m is applied in place, runs over the whole batch, is reverted; the flip
matrix F (B×M, F[i, m] = mutant m changes input i's label) is filled one column at a time.

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
from scipy.stats import norm
from torch import nn

from oodlib.mutants import Patch, applied

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


def fit_sprt_tau(lcr_correct: np.ndarray, confidence: float = 0.99, band: str = "population") -> float:
    """τ from the LCR of *correct* validation predictions: mean + a one-sided band.

    ``band="population"`` (default): mean + z_c·std, a band holding ~``confidence`` of correct
    predictions under a normal approximation. ``band="mean_ci"``: mean + z_((1+c)/2)·std/√N, the
    upper end of the confidence interval of the mean (Wang et al.'s code, "avg + 99% confidence").
    The mean-CI τ sits at the typical correct LCR, so a correct input that never flips needs
    ≈ 14.7/τ mutants to be decided — usually more than 100; the population band decides sooner.
    """
    x = np.asarray(lcr_correct, np.float64)
    if len(x) < 2:
        raise ValueError("fit_sprt_tau needs at least two correct validation predictions")
    if band == "population":
        tau = x.mean() + norm.ppf(confidence) * x.std(ddof=1)
    elif band == "mean_ci":
        tau = x.mean() + norm.ppf((1 + confidence) / 2) * x.std(ddof=1) / np.sqrt(len(x))
    else:
        raise ValueError(f"unknown band {band!r}; known: population, mean_ci")
    return float(tau)


@dataclass
class LCRResult:
    """Per input (B rows): ``lcr`` (float32), ``used`` mutants (int16), ``decision`` (int8, SPRT
    only, else None), and ``flips`` (B×M bool; only ``flips[i, :used[i]]`` were evaluated)."""

    flips: np.ndarray
    lcr: np.ndarray
    used: np.ndarray
    decision: np.ndarray | None = None


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    if batch_size is None or len(x) <= batch_size:
        return model(x).argmax(1)
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


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
    ``batch_size``: rows per forward (None = the whole batch at once).
    """
    if not patches:
        raise ValueError("label_change_rate needs at least one mutant")
    device = next(model.parameters()).device
    x = x.to(device)
    with torch.inference_mode():
        preds = _predict(model, x, batch_size) if preds is None else torch.as_tensor(preds, device=device).view(-1)
    b, m_total = len(x), len(patches)
    flips = torch.zeros(b, m_total, dtype=torch.bool, device=device)
    used = torch.full((b,), m_total, dtype=torch.long, device=device)
    decision = torch.full((b,), UNDECIDED, dtype=torch.int8, device=device)
    active = torch.arange(b, device=device)
    x_active, preds_active = x, preds
    for m, mutant in enumerate(patches):
        with applied(mutant), torch.inference_mode():
            flips[active, m] = _predict(model, x_active, batch_size) != preds_active
        if sprt is None:
            continue
        ratio = sprt.log_ratio(flips[active, : m + 1].sum(1).double(), m + 1)
        wrong, correct = ratio >= sprt.upper, ratio <= sprt.lower
        stop = wrong | correct
        if stop.any():
            decision[active[wrong]], decision[active[correct]] = WRONG, CORRECT
            used[active[stop]] = m + 1
            active = active[~stop]
            if len(active) == 0:
                break
            x_active, preds_active = x[active], preds[active]
    counted = torch.arange(m_total, device=device)[None, :] < used[:, None]
    lcr = (flips & counted).sum(1).double() / used.clamp(min=1)
    return LCRResult(
        flips=flips.cpu().numpy(),
        lcr=lcr.float().cpu().numpy(),
        used=used.to(torch.int16).cpu().numpy(),
        decision=decision.cpu().numpy() if sprt is not None else None,
    )
