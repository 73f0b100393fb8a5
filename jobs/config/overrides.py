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
        "explain.localization_images": 24, "explain.counts": {"wrong": 2, "uncertain": 2, "risky_ood": 2, "random": 2},
        "explain.methods": ["rap", "gradient"],  # one relevance rule and one gradient method: each adds a PNG grid
        # the C2ST's permutations are VERDICTS' whole cost (~2 s per 100 per batch); a smoke run's
        # drift level is 0.05, so 100 permutations can still resolve it
        "verdicts.alpha": 0.05, "verdicts.drift_permutations": 100,
    },
}


def profile_sets(name: str | None) -> list[str]:
    """The ``--set`` items of profile ``name`` (none for None)."""
    return [f"{k}={json.dumps(v)}" for k, v in PROFILES.get(name, {}).items()] if name else []
