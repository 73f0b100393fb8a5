"""Config sections of the stages (detectors, graph, explain, errors) and of the run (runtime, MLflow)."""
from __future__ import annotations

from typing import Literal

import math
from pydantic import Field, field_validator, model_validator

from jobs.config.base import PathField, Strict, checking_paths, in_ray_package, known_names


class DetectorConfig(Strict):
    """One score column: detector ``name`` with ``params``; the column is ``score_<column or name>``."""

    name: str
    params: dict[str, float | int | str | bool | None | list[float | int | str]] = Field(default_factory=dict)
    column: str | None = Field(default=None, pattern=r"^[a-z0-9_]+$")
    #: fit on this seeded fraction of the detector's ``fit_split`` (rows chosen by image id,
    #: :mod:`oodlib.sampling`), drawn in FIT's workers — and EMBED computes the detector's EMBED
    #: columns only on those rows of the split; for detectors fitted on the rows themselves (a
    #: bank, EMBED columns), not on partial sums; KNN/NNGuide draw their bank with ``alpha``
    fit_fraction: float = Field(default=1.0, gt=0, le=1)

    @property
    def key(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _fraction_of_rows(self) -> "DetectorConfig":
        from oodlib.detectors import DETECTORS

        cls = DETECTORS.get(self.name)
        if cls is not None and self.fit_fraction < 1:
            if hasattr(cls, "bank_sample"):
                raise ValueError(f"fit_fraction: {self.name} draws its bank with its own `alpha` parameter; set that instead")
            if "bank" not in cls.fit_needs and cls.fit_split == "train":
                raise ValueError(f"fit_fraction: {self.name} is fitted from partial sums over every ID-train row, "
                                 "not on rows it loads; a fraction does not apply")
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from oodlib.detectors import DETECTORS

        return known_names([v], DETECTORS, "detector")[0]


class GraphConfig(Strict):
    """Long-tailed OOD with graph embeddings (GRAPH stage): Gaussianized features → kNN graph → GCN."""

    enabled: bool = False
    #: long-tailed ID training set (its ``train`` split); BN statistics are re-estimated on it
    train_dataset: str = "digits-lt100"
    #: auxiliary outliers for outlier exposure (every split), never a test OOD set
    oe_dataset: str = "photo-oe"
    #: test OOD sets (default: data.ood_datasets)
    ood_datasets: list[str] | None = None
    ablations: list[str] = Field(default_factory=lambda: ["pretrain", "pretrain_gau", "pretrain_gcn", "gcn", "pretrain_gau_mlp"])
    k: int = Field(default=7, ge=2)
    hidden: int = Field(default=512, gt=0)
    epochs: int = Field(default=200, gt=0)
    seed: int = 0
    bn_finetune_epochs: int = Field(default=0, ge=0)
    #: inductive inference on random batches of this size (None = one graph per OOD set)
    batch_size: int | None = Field(default=None, gt=1)

    @field_validator("ablations")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from oodlib.longtail.detector import ABLATIONS

        return known_names(v, ABLATIONS, "ablation")


class LocalizationDataConfig(Strict):
    """Localization ground truth on disk (``oodlib.data.localization.localization_from_files``):
    a list file of ``path label [object_name]`` lines and either segmentation masks
    (``masks_dir/<image stem>.png``, non-zero = the object; ImageNet-S, the ImageNet segmentation
    subset) or PASCAL VOC box annotations (``voc_dir/<image stem>.xml``)."""

    list_file: PathField
    masks_dir: PathField | None = None
    voc_dir: PathField | None = None
    #: pointing-game tolerance in input pixels (15 is the usual value for VOC boxes)
    tolerance: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _paths_exist(self) -> "LocalizationDataConfig":
        if checking_paths() and not self.list_file.is_file():
            raise ValueError(f"list_file {self.list_file} does not exist")
        if (self.masks_dir is None) == (self.voc_dir is None):
            raise ValueError("give exactly one of masks_dir (segmentation masks) and voc_dir (VOC boxes)")
        folder = self.masks_dir or self.voc_dir
        if checking_paths() and not folder.is_dir():
            raise ValueError(f"{'masks_dir' if self.masks_dir else 'voc_dir'} {folder} is not a directory")
        return self


class ExplainConfig(Strict):
    """EXPLAIN: relevance maps for a selected sample and the localization benchmark."""

    enabled: bool = False
    methods: list[str] = Field(default_factory=lambda: ["rap", "ae", "lrp-eps", "lrp-a1b0", "gradient", "input-x-gradient", "integrated-gradients", "gradcam"])
    #: images per selection reason: wrong, uncertain, risky_ood, random
    counts: dict[Literal["wrong", "uncertain", "risky_ood", "random"], int] = Field(
        default_factory=lambda: {"wrong": 6, "uncertain": 6, "risky_ood": 6, "random": 6}
    )
    seed: int = 0
    #: run the localization benchmark: on ``localization_data`` when given, else on the embedded
    #: set (digits pasted on photo patches at known positions; a digits model)
    localization: bool = False
    #: images of the localization benchmark (the first that many of ``localization_data``)
    localization_images: int = Field(default=200, gt=0)
    localization_data: LocalizationDataConfig | None = None

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from oodlib.attribution import METHODS

        return known_names(v, METHODS, "method")


class MutantConfig(Strict):
    operator: Literal["GF", "NAI", "WS", "NS"] = "NAI"
    rate: float = Field(default=0.002, gt=0, lt=1)
    n_accepted: int = Field(default=100, gt=0)
    #: rejection-sampling cap (default 10 × n_accepted); hitting it is an error
    max_tries: int | None = Field(default=None, gt=0)


class SprtConfig(Strict):
    #: stop running mutants per batch once every input decided (saves mutant passes); off = run
    #: every mutant and apply the SPRT to the flip matrix afterwards (both LCRs available)
    early_stop: bool = False
    confidence: float = Field(default=0.99, gt=0.5, lt=1)
    #: τ from the LCR of correct validation predictions: their ``confidence``-quantile, or
    #: Wang et al.'s upper end of the confidence interval of the mean (``oodlib.lcr.fit_sprt_tau``)
    band: Literal["quantile", "mean_ci"] = "quantile"


class ErrorsConfig(Strict):
    """Wrong-prediction risk: layer conductance + error detector, LCR over mutants, fusion."""

    enabled: bool = False
    layer: str | None = None
    n_steps: int = Field(default=10, gt=0)
    method: Literal["right_riemann", "left_riemann", "gausslegendre"] = "right_riemann"
    mutants: MutantConfig = Field(default_factory=MutantConfig)
    sprt: SprtConfig = Field(default_factory=SprtConfig)
    #: labelled sets besides the ID splits where errors are evaluated (e.g. digits-c); their rows
    #: are split fit/val/test by source image (the last component of image_id), so no evaluated
    #: image has a corrupted twin among the detector's training rows
    extra_datasets: list[str] = Field(default_factory=list)
    detector_epochs: int = Field(default=100, gt=0)
    seed: int = 0
    #: FD-Shifts failure detection: OOD sets whose images count as new-class failures (correct = 0),
    #: each evaluated with the correct ID test predictions; None = the ``near`` group of
    #: ``data.ood_groups`` (none without it)
    new_class_datasets: list[str] | None = None
    #: bootstrap resamples for the 95% intervals of the failure metrics (FD-Shifts' studies use 500;
    #: 0 = no intervals)
    n_bootstrap: int = Field(default=200, ge=0)
    #: the seeded fraction of the ID train split (by image id) that forms the error detector's fit
    #: part: EMBED computes conductance and LCR only on those train rows
    fit_fraction: float = Field(default=1.0, gt=0, le=1)

    def new_class_sets(self, ood_groups: dict[str, list[str]]) -> list[str]:
        """The OOD sets of the new-class failure sources."""
        return list(self.new_class_datasets if self.new_class_datasets is not None else ood_groups.get("near", []))


class VerdictsConfig(Strict):
    """VERDICTS: calibrated thresholds, a verdict per image, flag rates per incoming batch, drift,
    the alert and the HTML report (:mod:`oodlib.verdicts`)."""

    enabled: bool = False
    #: an OOD detector's threshold keeps this fraction of the ID val split (flag = score < threshold)
    target_tpr: float = Field(default=0.95, gt=0, lt=1)
    #: a risk's threshold leaves this share of the correct predictions of the validation part
    #: unflagged (flag = risk ≥ threshold) — the counterpart of target_tpr, so that ID data show
    #: about (1 − target_tpr) + (1 − risk_keep_correct)·accuracy flags; null: use risk_recall
    risk_keep_correct: float | None = Field(default=0.95, gt=0, lt=1)
    #: with risk_keep_correct null: the threshold reaches this recall of wrong predictions; both
    #: null: the equal-recall point of the error tables (flags many ID images: ~1 − AUROC-ish of them)
    risk_recall: float | None = Field(default=None, gt=0, lt=1)
    #: the score column (``score_<x>``: give x) and risk (``risk_<x>``) the verdicts use; null =
    #: chosen from the validation metrics (best avg AUROC / best val AUROC), stated in the output
    primary_detector: str | None = None
    primary_risk: str | None = None
    #: bootstrap resamples of the threshold intervals
    n_boot: int = Field(default=1000, ge=50)
    seed: int = 0
    #: the alert fires when the newest batch's flag rate (lower Wilson bound) exceeds the expected ID
    #: flag rate (upper bound) by more than ``margin``, or a drift p-value is below ``alpha``
    margin: float = Field(default=0.02, ge=0, lt=1)
    alpha: float = Field(default=0.01, gt=0, lt=1)
    drift_max_rows: int = Field(default=1000, gt=10)
    #: the C2ST's permutations: its smallest p-value is 1/(1 + n), which must sit well below the
    #: drift level alpha/2 (two tests) for the test to be able to fire — checked
    drift_permutations: int = Field(default=400, ge=20)
    #: flagged images per incoming batch in the report (with relevance maps)
    top_k: int = Field(default=8, ge=0)

    @model_validator(mode="after")
    def _drift_can_fire(self) -> "VerdictsConfig":
        level = self.alpha / 2  # Bonferroni over the C2ST and the KS test
        if 1 / (1 + self.drift_permutations) > level / 2:
            need = math.ceil(2 / level) - 1
            raise ValueError(f"verdicts.drift_permutations: {self.drift_permutations} permutations give p-values ≥ "
                             f"{1 / (1 + self.drift_permutations):.4f}, too coarse for the drift level alpha/2 = {level:g}; "
                             f"use at least {need}")
        return self

    @model_validator(mode="after")
    def _one_risk_rule(self) -> "VerdictsConfig":
        if self.risk_keep_correct is not None and self.risk_recall is not None:
            raise ValueError("verdicts: set risk_keep_correct or risk_recall, not both (set risk_keep_correct: null to use risk_recall)")
        return self


class RuntimeConfig(Strict):
    """How the job behaves on the cluster."""

    #: fail a stage whose units of work (a features file, a score shard …) make no progress for
    #: this long — e.g. tasks waiting for CPUs a cluster does not have — with a message naming
    #: the cluster's resources; null waits forever
    stall_timeout_s: float | None = Field(default=1800.0, gt=0)
    #: refuse the job (exit 2, before any cluster resource) when the plan's estimated driver memory
    #: exceeds this many GiB (``oodlib plan`` and the start of every run); null = no limit
    max_driver_memory_gb: float | None = Field(default=None, gt=0)


class MlflowConfig(Strict):
    #: None → sqlite:///{output}/mlflow.db (or $MLFLOW_TRACKING_URI when set)
    tracking_uri: str | None = None
    enabled: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _not_in_ray_package(cls, v: str | None) -> str | None:
        """A relative SQLite store inside a Ray job would live in its package copy, unseen by the next job."""
        if v and v.startswith("sqlite:///") and not v.startswith("sqlite:////") and in_ray_package():
            raise ValueError(f"{v!r} is a relative SQLite path inside this Ray job's package directory: give an absolute "
                             "path (sqlite:////abs/mlflow.db) or a server URI, or submit with `oodlib submit`")
        return v
