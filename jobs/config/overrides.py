"""Command-line changes to a config: ``--set KEY=VALUE`` items and named ``--profile`` presets."""
from __future__ import annotations

import json

import yaml

from jobs.config.base import ConfigError


def parse_overrides(items: list[str]) -> dict:
    """``["embed.batch_size=64", …]`` → {"embed.batch_size": 64, …} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem or exc})") from None
    return out


#: named sets of overrides (``--profile``): applied before the user's ``--set``
PROFILES: dict[str, dict[str, object]] = {
    # every stage on, on a small sample: about a minute on 2 cores (the digits config)
    "smoke": {
        "data.limit_per_split": 60, "embed.num_shards": 4, "embed.shards_per_wave": 4,
        "errors.mutants.n_accepted": 8, "errors.mutants.max_tries": 400, "errors.detector_epochs": 5,
        "graph.epochs": 20, "graph.hidden": 32,
        "explain.localization_images": 12, "explain.counts": {"wrong": 2, "uncertain": 2, "risky_ood": 2, "random": 2},
        "explain.methods": ["rap", "gradient"],  # one relevance rule and one gradient method: each adds a PNG grid
        # the C2ST's permutations are most of VERDICTS' cost (~2.3 s per 100 per batch on one core); 80
        # are about the fewest the config check accepts for a smoke run's drift level 0.05
        "verdicts.alpha": 0.05, "verdicts.drift_permutations": 80,
        # one detector per way of fitting and per EMBED column, not all 41: each detector adds a fit,
        # a score column, a threshold with its bootstrap, a ROC/histogram PNG and an MLflow child run
        "detectors": ["msp", "energy", "odin", "mahalanobis", "react", {"name": "knn", "params": {"k": 50}},
                      {"name": "line", "params": {"p_w": 90, "p_a": 90, "delta": 1.0}}, "tempscale",
                      {"name": "vim", "params": {"dim": 32}}, "openmax", "gram", "multi_mahalanobis",
                      {"name": "nac", "params": {"alpha": [7, 0.01, 0.002], "m_bins": [50, 500, 50], "o_star": [50, 100, 5]}}, "rankfeat",
                      "adascale_a"],
    },
}


def profile_sets(name: str | None) -> list[str]:
    """The ``--set`` items of profile ``name`` (none for None)."""
    return [f"{k}={json.dumps(v)}" for k, v in PROFILES.get(name, {}).items()] if name else []
