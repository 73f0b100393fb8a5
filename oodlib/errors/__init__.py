"""Wrong-prediction risk: layer conductance, mutants and the label change rate (LCR), the error
detectors on them and their evaluation (the seed paper's tables).

* :mod:`~oodlib.errors.conductance` — feature-map layer conductance of the predicted class;
* :mod:`~oodlib.errors.mutants` — mutation operators and accepted-mutant sampling;
* :mod:`~oodlib.errors.lcr` — batched LCR with the SPRT early stop;
* :mod:`~oodlib.errors.detectors` — :class:`ErrorDetector` (the estimator contract, ``risk``:
  higher = more likely wrong), :class:`ConductanceErrorDetector`, :class:`FusionDetector`;
* :mod:`~oodlib.errors.evaluation` — tables, splits and :func:`fit_and_evaluate`;
* :mod:`~oodlib.errors.failure` — failure detection the FD-Shifts way: logit confidence baselines,
  temperature/Platt calibration, per-failure-source metrics with bootstrap intervals.

``ERROR_DETECTORS``: {registry name: class} of the registered error detectors. Plots live in
:mod:`oodlib.reporting.errors`.
"""
from oodlib.errors.conductance import (
    METHODS,
    ConductanceResult,
    LayerSplit,
    conductance_forward,
    inference_trunk,
    layer_conductance,
    path_alphas,
    split_at_layer,
)
from oodlib.errors.detectors import (
    FUSION_KINDS,
    ConductanceErrorDetector,
    ErrorDetector,
    FusionDetector,
    out_of_fold_risk,
)
from oodlib.errors.evaluation import (
    SPLITS,
    ErrorDetectionResult,
    auroc_vs_mutants,
    error_table,
    fit_and_evaluate,
    group_split,
    lcr_table,
    to_long_metrics,
)
from oodlib.errors.lcr import (
    CORRECT,
    SPRT,
    UNDECIDED,
    WRONG,
    LCRResult,
    first_mutated_stage,
    fit_sprt_tau,
    forward_stages,
    label_change_rate,
)
from oodlib.errors.mutants import (
    OPERATORS,
    TABLE_COLUMNS,
    Mutant,
    MutantSet,
    Patch,
    applied,
    generate_mutants,
    mutable_layers,
    mutant_patches,
    predict,
)
from oodlib.estimator import subclasses

ERROR_DETECTORS: dict[str, type[ErrorDetector]] = {cls.name: cls for cls in subclasses(ErrorDetector)}

__all__ = [
    "CORRECT", "ERROR_DETECTORS", "FUSION_KINDS", "METHODS", "OPERATORS", "SPLITS", "SPRT", "TABLE_COLUMNS",
    "UNDECIDED", "WRONG", "ConductanceErrorDetector", "ConductanceResult", "ErrorDetectionResult", "ErrorDetector",
    "FusionDetector", "LCRResult", "LayerSplit", "Mutant", "MutantSet", "Patch", "applied", "auroc_vs_mutants",
    "conductance_forward", "error_table", "first_mutated_stage", "fit_and_evaluate", "fit_sprt_tau",
    "forward_stages", "generate_mutants", "group_split", "inference_trunk", "label_change_rate", "layer_conductance",
    "lcr_table", "mutable_layers", "mutant_patches", "out_of_fold_risk", "path_alphas", "predict", "split_at_layer",
    "to_long_metrics",
]
