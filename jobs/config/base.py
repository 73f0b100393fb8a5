"""What every config section shares: strict models, path fields, the error type."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


def in_ray_package() -> bool:
    """Whether this process runs in a Ray job's uploaded copy of the working directory."""
    return any(part.startswith("_ray_pkg_") for part in Path.cwd().parts)


#: False while a config is read for planning only (``oodlib plan``): its input paths (and GPU
#: devices) need not exist here
_CHECK_PATHS: ContextVar[bool] = ContextVar("oodlib_check_paths", default=True)


def checking_paths() -> bool:
    """Whether config validation checks that input files and folders exist (not for ``oodlib plan``)."""
    return _CHECK_PATHS.get()


@contextmanager
def without_path_checks():
    """Validate configs without checking that their input paths exist (planning a run whose data
    is elsewhere)."""
    token = _CHECK_PATHS.set(False)
    try:
        yield
    finally:
        _CHECK_PATHS.reset(token)


class ConfigError(ValueError):
    """An invalid job configuration; the message names the offending field."""


def known_names(values: list[str], known, what: str) -> list[str]:
    """``values`` if every one is in ``known``, else a ValueError listing the unknown ones."""
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return values


class Strict(BaseModel):
    """Unknown keys are errors, values are never coerced across types (``true`` is not the
    integer 1, ``"8"`` is not a number); paths are given as strings (:data:`PathField`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


#: a path field: a string in the YAML (strict mode would demand a Path object)
PathField = Annotated[Path, Field(strict=False)]
