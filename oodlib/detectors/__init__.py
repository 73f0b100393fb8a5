"""Post-hoc OOD detectors. ``DETECTORS`` maps a config name to its class.

Every detector scores stored features/logits (ID-confidence, higher = more ID); fitted ones
take ``fit(features, labels, head)`` or, in the distributed FIT stage, ``fit_stats(stats, head)``
on merged :class:`oodlib.stats.FitStats` partials (``Detector.fit_needs`` says which). ODIN's
input-gradient part is :func:`odin_score`, run in EMBED. LINE's ablation columns
(``line_no_wp``, ``line_no_ap``, ``energy_ac``) come from :func:`line_ablations`.
"""
from oodlib.detectors.base import Detector, Head, ScoreInputs
from oodlib.detectors.dice import DICE, DICEReAct
from oodlib.detectors.knn import KNN
from oodlib.detectors.line import LINE, LINE_PRESETS, line_ablations
from oodlib.detectors.logits import MSP, Energy, MaxLogit, energy_score
from oodlib.detectors.mahalanobis import Mahalanobis
from oodlib.detectors.odin import ODIN, odin_score
from oodlib.detectors.react import ReAct

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (MSP, MaxLogit, Energy, ODIN, Mahalanobis, ReAct, DICE, DICEReAct, KNN, LINE)
}


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
