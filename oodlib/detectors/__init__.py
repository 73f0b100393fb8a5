"""Post-hoc OOD detectors, one module per detector. ``DETECTORS`` maps a config name to its class.

Every module of this package is imported here, and every :class:`Detector` subclass that sets its
own ``name`` is registered — adding a detector is adding one file. Every detector scores stored
features/logits (ID-confidence, higher = more ID); fitted ones take ``fit(features, labels, head)``
or, in the distributed FIT stage, ``fit_stats(stats, head)`` on merged
:class:`oodlib.stats.FitStats` partials (``Detector.fit_needs`` says which). A detector that needs
a per-image input computed in EMBED (ODIN's input gradients) names that column in ``requires``.
LINE's ablation columns (``line_no_wp``, ``line_no_ap``, ``energy_ac``) come from
:func:`line_ablations`.
"""
import importlib
import pkgutil

from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.estimator import subclasses

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from oodlib.detectors.dice import DICE, DICEReAct  # noqa: E402
from oodlib.detectors.knn import KNN  # noqa: E402
from oodlib.detectors.line import LINE, LINE_PRESETS, line_ablations  # noqa: E402
from oodlib.detectors.logits import MSP, Energy, MaxLogit, energy_score  # noqa: E402
from oodlib.detectors.mahalanobis import Mahalanobis  # noqa: E402
from oodlib.detectors.odin import ODIN, odin_score  # noqa: E402
from oodlib.detectors.react import ReAct  # noqa: E402

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in subclasses(Detector)}


def make_detector(name: str, **params) -> Detector:
    """Instantiate the detector registered as ``name`` with hyperparameters ``params``."""
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    return DETECTORS[name](**params)


__all__ = [
    "DETECTORS", "DICE", "DICEReAct", "Detector", "Energy", "Head", "KNN", "LINE", "LINE_PRESETS", "MSP",
    "Mahalanobis", "MaxLogit", "ODIN", "ReAct", "ScoreInputs", "energy_score", "line_ablations",
    "make_detector", "odin_score",
]
