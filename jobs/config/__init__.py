"""Job configuration: YAML validated into typed objects before any cluster resource is used.

A bad config raises :class:`ConfigError` whose message names the field (``embed.batch_size``),
and the entry points exit with code 2. Sections: :mod:`~jobs.config.inputs` (data, model, embed),
:mod:`~jobs.config.stages` (detectors, graph, explain, errors, runtime, mlflow),
:mod:`~jobs.config.job` (the whole job, reading and overrides). Importing it does not import torch.
"""
from jobs.config.base import ConfigError, PathField, Strict, known_names
from jobs.config.inputs import DataConfig, EmbedConfig, ImageSetConfig, ModelConfig
from jobs.config.job import JobConfig, load_config, parse_config, set_dotted
from jobs.config.overrides import PROFILES, parse_overrides, profile_sets
from jobs.config.stages import (
    DetectorConfig, ErrorsConfig, ExplainConfig, GraphConfig, LocalizationDataConfig, MlflowConfig, MutantConfig,
    RuntimeConfig, SprtConfig, VerdictsConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "DetectorConfig", "EmbedConfig", "ErrorsConfig", "ExplainConfig", "GraphConfig",
    "ImageSetConfig", "JobConfig", "LocalizationDataConfig", "MlflowConfig", "ModelConfig", "MutantConfig", "PathField",
    "PROFILES", "RuntimeConfig", "SprtConfig", "Strict", "known_names", "load_config", "parse_config", "parse_overrides",
    "profile_sets", "set_dotted", "VerdictsConfig",
]
