"""The base classes of the EMBED extras (:mod:`jobs.extras` holds the extras themselves and their
registry): what an extra declares — its columns, when a config wants it, its upstream state, the
rows it is needed on (:meth:`Extra.rows`) and its rough cost (:meth:`Extra.passes`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from jobs.config import ConfigError, JobConfig
from jobs.rows import RowNeeds, every_row, fit_rows, scored_rows
from oodlib.models import ModelAdapter


@dataclass(frozen=True)
class ExtraSpec:
    """What the actor needs to build one extra: its name, parameters and (a reference to) its state."""

    name: str
    params: dict = field(default_factory=dict)
    state: object = None  # ray.ObjectRef or a plain value


class Extra:
    """Base. ``columns`` (set per instance) maps each output column to its vector width (an int:
    float32 vector), None (float32 scalar) or a NumPy dtype name for an integer scalar."""

    name: ClassVar[str]
    #: column names this extra writes (the widths may depend on the model)
    provides: ClassVar[tuple[str, ...]]
    #: upstream stages whose results :meth:`state` reads
    upstream: ClassVar[tuple[str, ...]] = ()
    columns: dict[str, int | str | None]

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        """This extra's parameters under ``cfg``, or None when the config does not need it."""
        raise NotImplementedError

    @classmethod
    def state(cls, params: dict, up: dict[str, Any]) -> tuple[object, object]:
        """(state shipped to the actors, what identifies it in EMBED's content key)."""
        return None, None

    @classmethod
    def rows(cls, cfg: JobConfig) -> RowNeeds:
        """The manifest rows this extra is computed on (default: every row of the job)."""
        return every_row(cfg)

    @classmethod
    def passes(cls, params: dict, cfg: JobConfig) -> tuple[float, float]:
        """(forward, backward) passes of the network per row, for ``oodlib plan`` (roughly)."""
        return 1.0, 0.0

    def __init__(self, model: ModelAdapter, params: dict, state, device: torch.device) -> None:
        self.params = params

    def __call__(self, model: ModelAdapter, x: torch.Tensor, h: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def with_peers(self, peers: list["Extra"]) -> None:
        """Called before the extras computed on the same rows of a batch (``peers``, self among them)
        are called with them (a shared pass computes only what those need)."""


class DetectorInput(Extra):
    """An extra a detector reads: wanted when a configured detector ``requires`` one of its
    columns, with that detector's hyperparameters (the config allows one setting per column)."""

    @classmethod
    def wanted(cls, cfg: JobConfig) -> dict | None:
        """The EMBED parameters of the configured detectors that read this extra's columns; they
        must agree (the columns are computed once), else :class:`ConfigError` naming them."""
        from oodlib.detectors import DETECTORS

        settings = {}
        for d in cfg.detectors:
            det = DETECTORS[d.name]
            if set(det.requires) & set(cls.provides):
                settings[d.key] = cls.embed_params(det(**d.params).params(), cfg)
        if not settings:
            return None
        first = next(iter(settings.values()))
        if any(p != first for p in settings.values()):
            raise ConfigError(f"detectors: {sorted(settings)} read the `{cls.provides[0]}` column, computed once in EMBED, "
                              f"but ask for it with different parameters: {settings}")
        return first

    @classmethod
    def embed_params(cls, params: dict, cfg: JobConfig) -> dict:
        """The part of a detector's hyperparameters that changes this extra's columns (default: all)."""
        return params

    @classmethod
    def rows(cls, cfg: JobConfig) -> RowNeeds:
        """The rows SCORE evaluates the reading detectors on, plus — for a detector fitted on these
        columns — its ``fit_split`` (``fit_fraction`` of it)."""
        from oodlib.detectors import DETECTORS

        needs = scored_rows(cfg)
        for d in cfg.detectors:
            if set(DETECTORS[d.name].fit_columns) & set(cls.provides):
                needs |= fit_rows(cfg, DETECTORS[d.name].fit_split, d.fit_fraction)
        return needs
