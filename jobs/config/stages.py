"""Config sections of the stages (detectors, graph, explain, errors) and of the run (runtime, MLflow)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.config.base import PathField, Strict, in_ray_package, known_names


class DetectorConfig(Strict):
    """One score column: detector ``name`` with ``params``; the column is ``score_<column or name>``."""

    name: str
    params: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    column: str | None = Field(default=None, pattern=r"^[a-z0-9_]+$")

    @property
    def key(self) -> str:
        return self.column or self.name

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
        if not self.list_file.is_file():
            raise ValueError(f"list_file {self.list_file} does not exist")
        if (self.masks_dir is None) == (self.voc_dir is None):
            raise ValueError("give exactly one of masks_dir (segmentation masks) and voc_dir (VOC boxes)")
        folder = self.masks_dir or self.voc_dir
        if not folder.is_dir():
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

    def new_class_sets(self, ood_groups: dict[str, list[str]]) -> list[str]:
        """The OOD sets of the new-class failure sources."""
        return list(self.new_class_datasets if self.new_class_datasets is not None else ood_groups.get("near", []))


class RuntimeConfig(Strict):
    """How the job behaves on the cluster."""

    #: fail a stage whose units of work (a features file, a score shard …) make no progress for
    #: this long — e.g. tasks waiting for CPUs a cluster does not have — with a message naming
    #: the cluster's resources; null waits forever
    stall_timeout_s: float | None = Field(default=1800.0, gt=0)


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
