"""Job configuration: YAML validated into typed objects before any cluster resource is used.

A bad config raises :class:`ConfigError` whose message names the field (``embed.batch_size``),
and the entry points exit with code 2.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oodlib.detectors import DETECTORS
from oodlib.models import MODELS


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


class ImageSetConfig(Strict):
    """One image set on disk, turned into manifest rows: an ImageFolder tree (``root/<class>/…``),
    a flat folder of OOD images, a list file (``<relative path> <label>`` lines, e.g. ImageNet
    ``val.txt``), or CIFAR's binary batches (``data_batch_*.bin`` / ``test_batch.bin``: raw
    bytes, no pickle)."""

    dataset: str
    split: Literal["train", "val", "test"]
    kind: Literal["imagefolder", "list", "cifar10-binary", "cifar100-binary", "npy"] = "imagefolder"
    #: a folder; for ``npy`` a ``.npy`` file of N×H×W×3 uint8 images (e.g. TinyImages-300K)
    root: PathField
    list_file: PathField | None = None
    ood: bool = False
    #: make a long-tailed train set (first n_k images per class, n_k = n_max·ρ^(−k/(C−1))) and a
    #: balanced ``val`` split from the remainder (``val_per_class`` images per class)
    imbalance_ratio: float | None = Field(default=None, gt=1)
    val_per_class: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _paths_exist(self) -> "ImageSetConfig":
        if not self.root.exists():
            raise ValueError(f"root {self.root} does not exist (dataset {self.dataset!r})")
        if self.kind == "list" and (self.list_file is None or not self.list_file.is_file()):
            raise ValueError(f"list_file {self.list_file} does not exist (dataset {self.dataset!r})")
        return self


class DataConfig(Strict):
    """Which images: the embedded ``digits`` benchmark, a user manifest, or image sets on disk."""

    source: Literal["digits", "manifest", "folders"] = "digits"
    manifest: PathField | None = None
    sets: list[ImageSetConfig] = Field(default_factory=list)
    seed: int = 0
    id_dataset: str = "digits"
    ood_datasets: list[str] = Field(default_factory=lambda: ["digits-near", "photo-patches", "noise"])
    #: keep at most this many images per (dataset, split), every subset and class, evenly spaced — for quick runs and tests
    limit_per_split: int | None = Field(default=None, gt=0)
    #: extra datasets to embed and score without OOD evaluation (e.g. digits-c, LT train sets)
    extra_datasets: list[str] = Field(default_factory=list)
    #: an image file (or embedded image) larger than this is quarantined before it is read whole
    max_image_bytes: int = Field(default=64 * 2**20, gt=0)

    @model_validator(mode="after")
    def _manifest_given(self) -> "DataConfig":
        if self.source == "manifest":
            if self.manifest is None:
                raise ValueError("data.manifest is required when data.source is 'manifest'")
            if not self.manifest.exists():
                raise ValueError(f"data.manifest: file {self.manifest} does not exist")
        if self.source == "folders" and not self.sets:
            raise ValueError("data.sets must list the image sets when data.source is 'folders'")
        if not self.ood_datasets:
            raise ValueError("data.ood_datasets must name at least one OOD dataset")
        return self


class ModelConfig(Strict):
    name: str = "digits-cnn"
    weights: str | None = None
    num_classes: int | None = Field(default=None, gt=1)
    device: str = "auto"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return known_names([v], MODELS, "model")[0]

    @field_validator("device")
    @classmethod
    def _device_exists(cls, v: str) -> str:
        """``auto``, ``cpu``, ``cuda`` / ``cuda:N`` or ``mps`` — and a GPU device must exist here, or
        on the Ray cluster the job runs on (``$RAY_ADDRESS``)."""
        import os
        import re

        if v in ("auto", "cpu"):
            return v
        if not re.fullmatch(r"cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        if os.environ.get("RAY_ADDRESS"):
            return v  # the workers' devices are checked when the actors start
        import torch

        if v == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' but this machine has no MPS device")
        if v.startswith("cuda"):
            index = int(v.split(":")[1]) if ":" in v else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {v!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 "(and no RAY_ADDRESS cluster is set); use auto or cpu")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        # a value with a path separator or a file suffix is a file; anything else a torchvision weights name
        if v is not None and ("/" in v or Path(v).suffix) and not Path(v).exists():
            raise ValueError(f"weights file {v} does not exist")
        return v


class EmbedConfig(Strict):
    batch_size: int = Field(default=256, gt=0)
    #: actor pool size (max); min is 1
    num_actors: int = Field(default=1, gt=0)
    #: GPUs per actor: "auto" = 1 when the cluster has GPUs, else 0
    num_gpus_per_actor: Literal["auto"] | float = "auto"
    cpus_per_actor: float = Field(default=1.0, gt=0)
    #: the manifest is split into this many shards (sha1 of image_id); only new or changed shards
    #: are re-embedded on a later run. More shards = finer-grained recomputation, more files.
    num_shards: int = Field(default=32, gt=0, le=65536)
    #: shards embedded (and committed) per Ray Data pipeline; a crashed job resumes from the
    #: last committed wave
    shards_per_wave: int = Field(default=16, gt=0)


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


class JobConfig(Strict):
    experiment: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output: PathField = Path("outputs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    detectors: list[DetectorConfig] = Field(default_factory=lambda: [DetectorConfig(name=n) for n in ("msp", "maxlogit", "energy")])
    graph: GraphConfig = Field(default_factory=GraphConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    schedule: str = "manual"

    @field_validator("output")
    @classmethod
    def _output_is_a_directory(cls, v: Path) -> Path:
        """The output must be (or be creatable as) a directory: no file on the way."""
        for p in (v, *v.parents):
            if p.exists():
                if not p.is_dir():
                    raise ValueError(f"{p} is a file, not a directory" + ("" if p == v else f" (on the way to {v})"))
                break
        return v

    @field_validator("detectors", mode="before")
    @classmethod
    def _names_to_entries(cls, v):
        """Allow plain names (``- energy``) next to ``{name: …, params: …}`` entries."""
        return [{"name": d} if isinstance(d, str) else d for d in v]

    @model_validator(mode="after")
    def _error_sets_embedded(self) -> "JobConfig":
        missing = [d for d in self.errors.extra_datasets if d not in self.data.extra_datasets and d != self.data.id_dataset]
        if self.errors.enabled and missing:
            raise ValueError(f"errors.extra_datasets: {missing} must also be listed in data.extra_datasets")
        return self

    @model_validator(mode="after")
    def _embedded_localization_on_digits(self) -> "JobConfig":
        ex = self.explain
        if ex.enabled and ex.localization and ex.localization_data is None and self.model.name != "digits-cnn":
            raise ValueError(f"explain.localization_data: the embedded localization set is for digits-cnn; "
                             f"model {self.model.name!r} needs ground truth on disk (list_file + masks_dir or voc_dir)")
        return self

    @model_validator(mode="after")
    def _graph_sets_not_ood(self) -> "JobConfig":
        if self.graph.enabled and self.graph.oe_dataset in (self.graph.ood_datasets or self.data.ood_datasets):
            raise ValueError(f"graph.oe_dataset: {self.graph.oe_dataset!r} is also a test OOD set")
        return self

    @model_validator(mode="after")
    def _unique_detectors(self) -> "JobConfig":
        keys = [d.key for d in self.detectors]
        extra_params: dict[str, list] = {}  # a column computed in EMBED: one setting for every detector reading it
        for d in self.detectors:
            cls = DETECTORS[d.name]
            for column in set(cls.requires) - {"features", "logits"}:
                try:
                    extra_params.setdefault(column, []).append(cls(**d.params).params())
                except TypeError as exc:
                    raise ValueError(f"detectors[{d.key}].params: {exc}") from None
        for column, settings in extra_params.items():
            if any(p != settings[0] for p in settings):
                raise ValueError(f"detectors: the `{column}` column is computed once in EMBED; the detectors reading it "
                                 f"must share its parameters, got {settings}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"detectors: duplicate columns in {keys} (give settings distinct 'column' names)")
        return self

    def digest(self) -> str:
        """Hash of the whole config (recorded in MLflow and last_run.json)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def section_digest(self, *sections: str) -> dict:
        return json.loads(self.model_dump_json(include=set(sections)))


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before"))


def parse_config(raw: dict, source: str = "config") -> JobConfig:
    """Validate a config mapping; raise :class:`ConfigError` naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = _field_path(err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"  {field}: {msg}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> JobConfig:
    """Read a YAML config file, apply dotted ``overrides`` ({"embed.batch_size": 64}), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_config(raw, source=str(path))


def set_dotted(raw: dict, dotted: str, value) -> None:
    """Set ``raw["a"]["b"] = value`` for ``dotted = "a.b"``, creating mappings on the way."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a mapping")
    node[leaf] = value
