"""The one estimator contract of oodlib (scikit-learn's conventions), shared by the OOD detectors,
the wrong-prediction detectors and the long-tail graph method.

* Hyperparameters are the arguments of ``__init__``, stored under the same names; :meth:`params`
  reads them back from the signature (no hand-written lists).
* Fitted attributes end in ``_`` and exist only after ``fit`` (or :meth:`load_state_dict`);
  private caches derived from them start with ``_`` and are rebuilt by :meth:`_restore`.
  ``fit`` returns ``self``.
* Using an unfitted estimator raises :class:`NotFittedError` (``check_fitted``).
* One state format: :meth:`save` writes the fitted arrays as one safetensors file whose metadata
  holds the class name and the JSON hyperparameters; :meth:`load` restores an equal estimator.
  Never pickle. A fitted attribute is an array, a Python scalar (stored 0-d) or a dict of arrays
  (stored as ``attr.key`` entries).

Verbs differ where the meaning does: OOD detectors ``score`` (ID-confidence, higher = more ID),
error detectors ``risk`` (higher = more likely wrong), the graph method ``predict``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

FORMAT = "oodlib-estimator/1"
E = TypeVar("E", bound="Estimator")


class NotFittedError(ValueError, AttributeError):
    """An estimator was used before ``fit`` (or ``load``)."""


class Estimator:
    """Base class of every fitted oodlib estimator (see the module docstring for the contract).

    ``stateless = True`` marks an estimator with nothing to fit (e.g. MSP): it is always fitted.
    ``name`` is the registry name (the config name of a detector).
    """

    name: ClassVar[str]
    stateless: ClassVar[bool] = False

    @classmethod
    def contract_variants(cls) -> list[dict]:
        """Hyperparameter sets the contract tests (``tests/contract``) build one instance of each:
        one per structurally different setting (e.g. a fusion's classifier kind), small and fast."""
        return [{}]

    # --- hyperparameters -----------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """The hyperparameter names: ``__init__``'s named arguments."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (JSON-able: tuples become lists)."""
        return {k: _jsonable(getattr(self, k)) for k in self.param_names()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    # --- fitted state --------------------------------------------------------------------
    def fitted_attributes(self) -> dict:
        """The fitted attributes present (names ending in ``_``, not private)."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    @property
    def is_fitted(self) -> bool:
        return self.stateless or bool(self.fitted_attributes())

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless fitted (or stateless)."""
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(...) or load(...) first")

    def state_dict(self) -> dict[str, np.ndarray]:
        """The fitted attributes as arrays: scalars 0-d, dicts flattened to ``attr.key``."""
        self.check_fitted()
        out: dict[str, np.ndarray] = {}
        for k, v in self.fitted_attributes().items():
            if v is None:
                continue
            if isinstance(v, dict):
                out.update({f"{k}.{sub}": np.asarray(a) for sub, a in v.items()})
            else:
                out[k] = np.asarray(v)
        return out

    def load_state_dict(self: E, state: dict[str, np.ndarray]) -> E:
        """Set the fitted attributes from :meth:`state_dict` output; returns self."""
        for k in list(self.fitted_attributes()):
            delattr(self, k)
        nested: dict[str, dict] = {}
        for key, value in state.items():
            attr, _, sub = key.partition(".")
            if not attr.endswith("_"):
                raise ValueError(f"{type(self).__name__}: state entry {key!r} is not a fitted attribute (must end in '_')")
            value = np.asarray(value)
            if sub:
                nested.setdefault(attr, {})[sub] = value
            else:
                setattr(self, attr, value.item() if value.ndim == 0 else value)
        for attr, d in nested.items():
            setattr(self, attr, d)
        self._restore()
        return self

    def _restore(self) -> None:
        """Rebuild private caches from the fitted attributes (after ``fit`` or loading)."""

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted state and hyperparameters to one safetensors file."""
        from safetensors.numpy import save_file

        path = Path(path)
        # ascontiguousarray makes 0-d arrays 1-d: reshape keeps scalars 0-d (loaded back as scalars)
        state = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "class": type(self).__qualname__, "params": json.dumps(self.params())}
        save_file(state, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls: type[E], path: str | Path) -> E:
        """An estimator equal to the saved one (:meth:`save`); the file must be of this class."""
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an oodlib estimator file (format {meta.get('format')!r})")
        if meta.get("class") != cls.__qualname__:
            raise ValueError(f"{path}: holds a {meta.get('class')}, not a {cls.__qualname__}")
        est = cls(**json.loads(meta["params"]))
        return est.load_state_dict(load_file(str(path)))


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def subclasses(base: type) -> list[type]:
    """Every subclass of ``base`` (recursively) that defines its own ``name``: the registered ones."""
    out, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if "name" in vars(cls):
            out.append(cls)
    return out
