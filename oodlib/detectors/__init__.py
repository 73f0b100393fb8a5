"""Post-hoc OOD detectors. ``DETECTORS`` maps a config name to its class."""
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.logits import MSP, Energy, MaxLogit

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (MSP, MaxLogit, Energy)}


def make_detector(name: str, **params) -> Detector:
    """Instantiate the detector registered as ``name`` with hyperparameters ``params``."""
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    return DETECTORS[name](**params)


__all__ = ["DETECTORS", "Detector", "Energy", "Head", "MSP", "MaxLogit", "ScoreInputs", "make_detector"]
