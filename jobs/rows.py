"""Which manifest rows need an EMBED extra (:meth:`jobs.extras.Extra.rows`).

An extra declares the rows it is needed on as a :class:`RowNeeds`: per (dataset, split) — split
``None`` = every split of the dataset — the fraction of those rows, a seeded sample by image id
(:mod:`oodlib.sampling`, seed :data:`FIT_SEED`: the same rows for every extra and for FIT, which
fits on exactly those rows). EMBED computes an extra only on its rows; elsewhere its columns are
"missing" (see :mod:`jobs.embed_pass`: null scalars, all-NaN vectors), and SCORE writes a null
score for a detector that reads a missing column. The needs enter EMBED's content key.

Typical needs: a detector's EMBED input on the rows SCORE evaluates it on (:func:`scored_rows`:
the ID val and test splits, the OOD, extra and incoming sets — not the ID train split, nor the
graph's own sets) plus the rows it is fitted on (:func:`fit_rows`: its ``fit_split``, a fraction
of the train split with ``fit_fraction``); conductance and LCR on the ERRORS rows; ``gfeatures`` on
the GRAPH sets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from jobs.config import JobConfig

#: seed of every fit-fraction sample (:func:`oodlib.sampling.unit_hash`)
FIT_SEED = 0


@dataclass(frozen=True)
class RowNeeds:
    """{(dataset, split or None): fraction} — a row is needed when it matches an entry and its
    ``u(image_id)`` is below that entry's fraction (the largest of the entries it matches)."""

    parts: dict[tuple[str, str | None], float] = field(default_factory=dict)

    @classmethod
    def of(cls, datasets, split: str | None = None, fraction: float = 1.0) -> "RowNeeds":
        return cls({(d, split): float(fraction) for d in datasets})

    def __or__(self, other: "RowNeeds") -> "RowNeeds":
        parts = dict(self.parts)
        for k, f in other.parts.items():
            parts[k] = max(parts.get(k, 0.0), f)
        return RowNeeds(parts)

    def key(self) -> list:
        """What identifies the selection (EMBED's content key)."""
        return sorted([d, s or "*", f] for (d, s), f in self.parts.items())

    def fraction_of(self, dataset: str, split: str) -> float:
        return max((f for (d, s), f in self.parts.items() if d == dataset and s in (None, split)), default=0.0)

    def mask(self, rows: pa.Table, u: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of the needed manifest ``rows``; ``u`` = their ``unit_hash(image_id, FIT_SEED)``
        (computed here when a fraction below 1 needs it)."""
        datasets = np.asarray(rows.column("dataset").to_pylist(), object)
        splits = np.asarray(rows.column("split").to_pylist(), object)
        frac = np.zeros(rows.num_rows)
        for (d, s), f in self.parts.items():
            hit = datasets == d if s is None else (datasets == d) & (splits == s)
            frac[hit] = np.maximum(frac[hit], f)
        keep = frac >= 1.0
        partial = (frac > 0) & ~keep
        if partial.any():
            if u is None:
                from oodlib.sampling import unit_hash

                u = unit_hash(rows.column("image_id").to_pylist(), FIT_SEED)
            keep |= partial & (u < frac)
        return keep

    def splits(self) -> dict[str, tuple[str, ...] | None]:
        """{dataset: its splits, or None for every split} (:func:`jobs.storage.rows_filter`); only for
        needs of whole splits (a fraction below 1 selects by image-id hash, which no filter expresses)."""
        if any(f < 1.0 for f in self.parts.values()):
            raise ValueError(f"row needs with a fraction below 1 have no split filter: {self.key()}")
        out: dict[str, tuple[str, ...] | None] = {}
        for d, s in sorted(self.parts, key=lambda p: (p[0], p[1] or "")):
            out[d] = None if s is None or out.get(d, ()) is None else (*out.get(d, ()), s)
        return out

    def expected(self, counts: dict[tuple[str, str], int]) -> float:
        """Expected needed rows given the rows per (dataset, split)."""
        return float(sum(n * min(1.0, self.fraction_of(d, s)) for (d, s), n in counts.items()))


def every_row(cfg: JobConfig) -> RowNeeds:
    """Every row of the datasets the job names."""
    d, g = cfg.data, cfg.graph
    return RowNeeds.of([d.id_dataset, *d.ood_datasets, *d.extra_datasets, *d.incoming_datasets,
                        *((g.train_dataset, g.oe_dataset) if g.enabled else ())])


def scored_rows(cfg: JobConfig) -> RowNeeds:
    """The rows SCORE's columns are evaluated on: ID val and test, the OOD, extra and incoming sets."""
    d = cfg.data
    return RowNeeds.of([d.id_dataset], "val") | RowNeeds.of([d.id_dataset], "test") | RowNeeds.of(
        [*d.ood_datasets, *d.extra_datasets, *d.incoming_datasets])


def fit_rows(cfg: JobConfig, split: str, fraction: float = 1.0) -> RowNeeds:
    """The ID rows a detector is fitted on: its ``fit_split``, a fraction of it."""
    return RowNeeds.of([cfg.data.id_dataset], split, fraction)


def errors_rows(cfg: JobConfig) -> RowNeeds:
    """The ERRORS rows: the ID val and test splits, ``errors.fit_fraction`` of the ID train split (the
    error detector's fit part), every row of ``errors.extra_datasets``, the incoming sets and the
    new-class (OOD) sets of failure detection."""
    d, e = cfg.data, cfg.errors
    return (RowNeeds.of([d.id_dataset], "val") | RowNeeds.of([d.id_dataset], "test")
            | RowNeeds.of([d.id_dataset], "train", e.fit_fraction)
            | RowNeeds.of([*e.extra_datasets, *d.incoming_datasets, *e.new_class_sets(d.ood_groups)]))


def graph_rows(cfg: JobConfig) -> RowNeeds:
    """The GRAPH rows: its long-tailed train split, the OE set, ID val and test, its OOD sets."""
    g, d = cfg.graph, cfg.data
    return (RowNeeds.of([g.train_dataset], "train") | RowNeeds.of([g.oe_dataset])
            | RowNeeds.of([d.id_dataset], "val") | RowNeeds.of([d.id_dataset], "test")
            | RowNeeds.of(g.ood_datasets or d.ood_datasets))


def extra_rows_column(rows: pa.Table, needs: dict[str, RowNeeds]) -> np.ndarray:
    """The ``extra_rows`` bit mask (int64) of every manifest row: bit i set = the i-th extra of
    ``needs`` (in its order; at most 63) is computed on that row."""
    if len(needs) > 63:
        raise ValueError(f"{len(needs)} EMBED extras: at most 63 fit the extra_rows bit mask")
    u = None
    if any(0 < f < 1 for n in needs.values() for f in n.parts.values()):
        from oodlib.sampling import unit_hash

        u = unit_hash(rows.column("image_id").to_pylist(), FIT_SEED)
    bits = np.zeros(rows.num_rows, np.int64)
    for i, n in enumerate(needs.values()):
        bits |= n.mask(rows, u).astype(np.int64) << i
    return bits
