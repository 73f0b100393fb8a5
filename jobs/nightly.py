"""The job's entry point, what ``ray job submit`` runs (= ``oodlib run``):

    python -m jobs.nightly --config configs/digits.yaml [--set embed.batch_size=128] [--schedule nightly]

The config is validated before Ray starts (exit code 2 on a bad config, naming the field).
Stages whose content key is already committed are reused. See :mod:`jobs.pipeline`.
"""
from __future__ import annotations

import sys

from jobs.cli import entry


if __name__ == "__main__":
    entry(["run", *sys.argv[1:]])
