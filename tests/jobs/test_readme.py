"""The README's code runs as written: the library example (a doctest) and the commands that read
the published tables (against a real run's output)."""
from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_library_example_doctest():
    block = next(b for b in python_blocks() if ">>> " in b)
    test = doctest.DocTestParser().get_doctest(block, {}, "README: As a library", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 10


@pytest.mark.slow
def test_reading_the_published_tables(tmp_path, monkeypatch, ray_local):  # noqa: F811
    from jobs import pipeline
    from jobs.config import parse_config

    pipeline.run(parse_config({
        "experiment": "digits", "output": str(tmp_path / "outputs"), "data": {"source": "digits", "limit_per_split": 30},
        "embed": {"batch_size": 64, "num_actors": 1, "num_shards": 2}, "detectors": ["msp", "energy"], "mlflow": {"enabled": False},
    }))
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "scan_delta" in b)
    exec(compile(block, "README: reading the tables", "exec"), {})


from tests.jobs.test_pipeline import ray_local  # noqa: E402,F401  (the module's Ray fixture)
