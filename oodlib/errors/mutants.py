"""Model mutants (Wang et al., ICSE 2019): GF, NAI, WS, NS, regenerated from (operator, rate, seed).

A *neuron* is an output row of a conv or linear weight (an out-channel / output unit); the
mutable modules are every ``nn.Conv*d`` and ``nn.Linear`` of the model (head included), in
``named_modules`` order. Operators:

* ``GF`` — Gaussian fuzzing: k = max(1, round(r·S)) of all S weight scalars, drawn uniformly,
  are redrawn from N(mean, std) of their own tensor.
* ``NAI`` — neuron activation inverse: k = max(1, round(r·N)) of all N neurons have their
  weight row and bias entry negated.
* ``WS`` — weight shuffling: k = max(1, round(r·N)) neurons have their incoming weights (the
  row's scalars) randomly permuted.
* ``NS`` — neuron switch: in every layer with n ≥ 10 neurons, ⌊n·r⌋ neurons (when ≥ 2) are
  switched — their weight rows and bias entries are cyclically exchanged, so each one moves.

A mutant is never stored as weights: :func:`mutant_patches` computes it deterministically from
the original model and its seed as a few (parameter, flat indices, new values) patches, and
:func:`applied` writes them in place and restores the saved originals on exit (exact).
Acceptance (:func:`generate_mutants`): a mutant is kept only if its accuracy on the validation
split is ≥ 0.9 × the original model's; seeds are tried in order 0, 1, 2, … (rejection sampling).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

OPERATORS = ("GF", "NAI", "WS", "NS")
TABLE_COLUMNS = ("operator", "rate", "seed", "val_acc", "accepted")


@dataclass(frozen=True)
class Mutant:
    """A mutant's identity: operator (one of :data:`OPERATORS`), rate r, seed."""

    operator: str
    rate: float
    seed: int

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"unknown mutation operator {self.operator!r}; known: {OPERATORS}")
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"mutation rate must be in (0, 1], got {self.rate}")


@dataclass
class Patch:
    """New ``values`` for the flat positions ``index`` of parameter ``param`` (1-D tensors)."""

    param: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor


def mutable_layers(model: nn.Module) -> list[nn.Module]:
    """The conv and linear modules of ``model`` (each once), in ``named_modules`` order."""
    return [m for _, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def _row_patches(layer: nn.Module, rows: np.ndarray, new_rows: torch.Tensor, new_bias: torch.Tensor | None) -> list[Patch]:
    """Patches that set whole weight rows ``rows`` (and bias entries) of ``layer``."""
    w = layer.weight.detach()
    row_size = w[0].numel()
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=w.device)
    index = (rows_t[:, None] * row_size + torch.arange(row_size, device=w.device)).reshape(-1)
    patches = [Patch(w, index, new_rows.reshape(-1))]
    if layer.bias is not None and new_bias is not None:
        patches.append(Patch(layer.bias.detach(), rows_t, new_bias))
    return patches


def _pick_neurons(layers: list[nn.Module], rate: float, rng: np.random.Generator) -> list[tuple[nn.Module, np.ndarray]]:
    """k = max(1, round(rate·N)) neurons drawn uniformly from all N, grouped per layer."""
    sizes = np.array([m.weight.shape[0] for m in layers])
    total = int(sizes.sum())
    chosen = np.sort(rng.choice(total, size=max(1, round(rate * total)), replace=False))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    owner = np.searchsorted(starts, chosen, side="right") - 1
    return [(layers[i], chosen[owner == i] - starts[i]) for i in np.unique(owner)]


def _gaussian_fuzzing(layers: list[nn.Module], rate: float, rng: np.random.Generator) -> list[Patch]:
    sizes = np.array([m.weight.numel() for m in layers])
    total = int(sizes.sum())
    chosen = np.sort(rng.choice(total, size=max(1, round(rate * total)), replace=False))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    owner = np.searchsorted(starts, chosen, side="right") - 1
    patches = []
    for i in np.unique(owner):
        w = layers[i].weight.detach()
        idx = chosen[owner == i] - starts[i]
        mean, std = float(w.mean()), float(w.std()) if w.numel() > 1 else 0.0
        values = torch.as_tensor(rng.normal(mean, std, size=len(idx)), dtype=w.dtype, device=w.device)
        patches.append(Patch(w, torch.as_tensor(idx, dtype=torch.long, device=w.device), values))
    return patches


def _neuron_inverse(layers: list[nn.Module], rate: float, rng: np.random.Generator) -> list[Patch]:
    patches = []
    for layer, rows in _pick_neurons(layers, rate, rng):
        rows_t = torch.as_tensor(rows, device=layer.weight.device)
        bias = -layer.bias.detach()[rows_t] if layer.bias is not None else None
        patches += _row_patches(layer, rows, -layer.weight.detach()[rows_t], bias)
    return patches


def _weight_shuffle(layers: list[nn.Module], rate: float, rng: np.random.Generator) -> list[Patch]:
    patches = []
    for layer, rows in _pick_neurons(layers, rate, rng):
        w = layer.weight.detach()
        flat_rows = w.reshape(w.shape[0], -1)[torch.as_tensor(rows, device=w.device)]
        perms = torch.as_tensor(np.stack([rng.permutation(flat_rows.shape[1]) for _ in rows]), device=w.device)
        patches += _row_patches(layer, rows, flat_rows.gather(1, perms), None)
    return patches


def _neuron_switch(layers: list[nn.Module], rate: float, rng: np.random.Generator) -> list[Patch]:
    patches = []
    for layer in layers:
        n = layer.weight.shape[0]
        k = int(np.floor(n * rate))
        if n < 10 or k < 2:
            continue
        rows = rng.choice(n, size=k, replace=False)
        source = torch.as_tensor(np.roll(rows, 1), device=layer.weight.device)  # a cycle: every row moves
        bias = layer.bias.detach()[source] if layer.bias is not None else None
        patches += _row_patches(layer, rows, layer.weight.detach()[source], bias)
    if not patches:
        raise ValueError(f"NS at rate {rate} switches no neurons (needs ⌊n·r⌋ ≥ 2 in a layer with n ≥ 10)")
    return patches


_OPERATOR_FUNCS = {"GF": _gaussian_fuzzing, "NAI": _neuron_inverse, "WS": _weight_shuffle, "NS": _neuron_switch}


def mutant_patches(model: nn.Module, mutant: Mutant) -> list[Patch]:
    """The patches that turn the (unmutated) ``model`` into ``mutant``; deterministic in the seed."""
    rng = np.random.default_rng(mutant.seed)
    with torch.no_grad():
        return _OPERATOR_FUNCS[mutant.operator](mutable_layers(model), mutant.rate, rng)


@contextmanager
def applied(patches: list[Patch]) -> Iterator[None]:
    """Write ``patches`` into their parameters in place; restore the exact originals on exit.

    Not thread-safe: the model is the mutant while the context is open.
    """
    saved = []
    with torch.no_grad():
        try:
            for p in patches:
                flat = p.param.view(-1)
                saved.append((flat, p.index, flat[p.index].clone()))
                flat[p.index] = p.values
            yield
        finally:
            for flat, index, old in reversed(saved):
                flat[index] = old


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes (N,) of the normalized inputs ``x``, in batches, without autograd."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch_size].to(device)).argmax(1) for i in range(0, len(x), batch_size)])


@dataclass
class MutantSet:
    """Every mutant tried, as a table (:data:`TABLE_COLUMNS`); ``mutants`` are the accepted ones
    in acceptance order (the fixed order LCR and the SPRT use)."""

    table: pd.DataFrame
    original_val_acc: float = float("nan")

    @property
    def mutants(self) -> list[Mutant]:
        acc = self.table[self.table["accepted"]]
        return [Mutant(o, float(r), int(s)) for o, r, s in zip(acc["operator"], acc["rate"], acc["seed"])]

    @property
    def n_accepted(self) -> int:
        return int(self.table["accepted"].sum())

    @property
    def n_rejected(self) -> int:
        return int((~self.table["accepted"]).sum())

    def patches(self, model: nn.Module) -> list[list[Patch]]:
        """Patches of every accepted mutant for the unmutated ``model``, in order (in memory only;
        an embed actor builds them once and reuses them for every batch)."""
        return [mutant_patches(model, m) for m in self.mutants]

    def to_frame(self) -> pd.DataFrame:
        """The table (operator str, rate float, seed int, val_acc float, accepted bool)."""
        return self.table.copy()

    @classmethod
    def from_frame(cls, table: pd.DataFrame, original_val_acc: float = float("nan")) -> MutantSet:
        missing = set(TABLE_COLUMNS) - set(table.columns)
        if missing:
            raise ValueError(f"mutant table lacks columns {sorted(missing)}")
        t = table.loc[:, list(TABLE_COLUMNS)].reset_index(drop=True).astype(
            {"operator": str, "rate": float, "seed": "int64", "val_acc": float, "accepted": bool}
        )
        return cls(t, original_val_acc)


def generate_mutants(
    model: nn.Module,
    x_val: torch.Tensor,
    y_val: np.ndarray | torch.Tensor,
    operator: str = "NAI",
    rate: float = 0.002,
    n_accepted: int = 100,
    max_tries: int | None = None,
    min_relative_acc: float = 0.9,
    first_seed: int = 0,
) -> MutantSet:
    """Rejection-sample ``n_accepted`` mutants with val accuracy ≥ ``min_relative_acc`` × original.

    Seeds ``first_seed, first_seed+1, …`` are tried in order; at most ``max_tries`` (default
    10 × ``n_accepted``). Raises ``RuntimeError`` naming the accepted/rejected counts when the
    cap is hit. ``x_val``: normalized validation inputs (N×…); ``y_val``: true labels (N,).
    """
    max_tries = 10 * n_accepted if max_tries is None else max_tries
    device = next(model.parameters()).device
    y = torch.as_tensor(np.asarray(y_val), device=device)
    x_val = x_val.to(device)
    base_acc = float((predict(model, x_val) == y).float().mean())
    rows: list[tuple] = []
    accepted = 0
    for seed in range(first_seed, first_seed + max_tries):
        mutant = Mutant(operator, rate, seed)
        with applied(mutant_patches(model, mutant)):
            acc = float((predict(model, x_val) == y).float().mean())
        ok = acc >= min_relative_acc * base_acc
        rows.append((operator, float(rate), seed, acc, ok))
        accepted += ok
        if accepted == n_accepted:
            return MutantSet(pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), base_acc)
    raise RuntimeError(
        f"{operator} at rate {rate}: only {accepted} of {n_accepted} mutants accepted after {max_tries} tries "
        f"({max_tries - accepted} rejected; original val accuracy {base_acc:.4f}, bar {min_relative_acc * base_acc:.4f}); "
        "lower the rate or raise max_tries"
    )
