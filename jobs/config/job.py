"""The job config (every section) and how it is read: YAML → validated :class:`JobConfig`."""
from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from jobs.config.base import ConfigError, PathField, Strict, checking_paths, in_ray_package
from jobs.config.inputs import DataConfig, EmbedConfig, ModelConfig
from jobs.config.stages import (
    DetectorConfig, ErrorsConfig, ExplainConfig, GraphConfig, MlflowConfig, RuntimeConfig, VerdictsConfig,
)


class JobConfig(Strict):
    experiment: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    #: a local directory (a Path), or an object-store prefix ``s3://bucket/prefix`` / ``gs://…`` (a str)
    output: PathField | str = Path("outputs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    detectors: list[DetectorConfig] = Field(default_factory=lambda: [DetectorConfig(name=n) for n in ("msp", "maxlogit", "energy")])
    graph: GraphConfig = Field(default_factory=GraphConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig)
    verdicts: VerdictsConfig = Field(default_factory=VerdictsConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    schedule: str = "manual"

    @field_validator("output", mode="before")
    @classmethod
    def _output_uri(cls, v):
        """A path (``file://`` URIs included) becomes a Path; ``s3://bucket[/prefix]`` and
        ``gs://…`` stay URIs (:mod:`jobs.store`); any other scheme is refused."""
        if not isinstance(v, str):
            return v
        if "://" not in v:
            return Path(v)
        scheme, _, rest = v.partition("://")
        if scheme == "file":
            return Path(rest)
        from jobs.store import SCHEMES

        if scheme not in SCHEMES:
            raise ValueError(f"{scheme}:// is not a supported output: give a local path, or a file://, s3:// or gs:// URI")
        if not rest.strip("/"):
            raise ValueError(f"{v!r} names no bucket (expected {scheme}://bucket/prefix)")
        return f"{scheme}://{rest.strip('/')}"

    @field_validator("output")
    @classmethod
    def _output_is_a_directory(cls, v: Path | str) -> Path | str:
        """The output must be (or be creatable as) a directory: no file on the way; and inside a
        Ray job it must be absolute (a relative one would land in the job's package copy). An
        object-store output must be writable (a probe object is written and deleted)."""
        if isinstance(v, str):
            if checking_paths():
                from jobs.store import check_writable

                check_writable(v)
            return v
        if not v.is_absolute() and in_ray_package():
            raise ValueError(f"relative path {str(v)!r} would resolve inside this Ray job's package directory "
                             f"({Path.cwd()}), which the next job does not see; give an absolute path or a file:// URI, "
                             "or submit with `oodlib submit`, which resolves it on the submitting side")
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
        unknown = [d for d in self.errors.new_class_datasets or [] if d not in self.data.ood_datasets]
        if self.errors.enabled and unknown:
            raise ValueError(f"errors.new_class_datasets: {unknown} must be OOD sets (data.ood_datasets)")
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
        v = self.verdicts
        if v.enabled and v.primary_detector is not None and v.primary_detector not in keys:
            raise ValueError(f"verdicts.primary_detector: {v.primary_detector!r} is not a configured detector column ({keys})")
        if v.enabled and v.primary_risk is not None and not self.errors.enabled:
            raise ValueError("verdicts.primary_risk: the risks come from the errors stage; set errors.enabled")
        if len(set(keys)) != len(keys):
            raise ValueError(f"detectors: duplicate columns in {keys} (give settings distinct 'column' names)")
        return self

    def digest(self) -> str:
        """Hash of the whole config (recorded in MLflow and last_run.json)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


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
