"""`oodlib sweep`: a detector's hyperparameter grid over the stored features."""
import numpy as np
import pandas as pd
import pytest

from jobs import cli, sweep
from jobs.config import ConfigError, parse_config
from tests.jobs.test_pipeline import ray_local, small_config  # noqa: F401  (the module's Ray fixture)


def test_parse_axis_and_grid(tmp_path):
    assert sweep.parse_axis("line.delta=0.1,inf") == ("line", "delta", [0.1, None])
    with pytest.raises(ConfigError, match="DETECTOR.PARAM"):
        sweep.parse_axis("delta=0.1")
    cfg = parse_config({**small_config(tmp_path), "detectors": [{"name": "line", "params": {"p_w": 50}}]})
    entries, settings = sweep.grid_detectors(cfg, [sweep.parse_axis("line.p_a=10,90"), sweep.parse_axis("line.delta=1,off")])
    assert [e.params for e in entries] == [{"p_w": 50, "p_a": 10, "delta": 1}, {"p_w": 50, "p_a": 10, "delta": None},
                                          {"p_w": 50, "p_a": 90, "delta": 1}, {"p_w": 50, "p_a": 90, "delta": None}]
    assert list(settings.columns) == ["column", "p_a", "delta"] and settings.delta.tolist() == ["1", "off", "1", "off"]
    assert [e.column for e in entries] == ["line_p_a_10_delta_1", "line_p_a_10_delta_off", "line_p_a_90_delta_1", "line_p_a_90_delta_off"]
    assert sweep.value_token(0.8) == "0p8" and sweep.value_token(-1) == "m1"
    with pytest.raises(ConfigError, match="one detector at a time"):
        sweep.grid_detectors(cfg, [sweep.parse_axis("line.p_a=10"), sweep.parse_axis("energy.temperature=2")])


@pytest.mark.slow
def test_sweep_reuses_embed_and_tables_equal_metrics(tmp_path, ray_local):  # noqa: F811
    import yaml

    raw = small_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["run", "--config", str(path)]) == 0
    assert cli.main(["sweep", "--config", str(path), "--grid", "energy.temperature=1,3"]) == 0
    table = pd.read_parquet(next((tmp_path / "out" / "t" / "sweeps").glob("key=*/sweep.parquet")))
    assert table.temperature.tolist() == ["1", "3"]
    import json

    summary = json.loads((tmp_path / "out" / "t" / "last_run.json").read_text())
    assert summary["reused"]["embed"] is True and "errors" not in summary["reused"]
    metrics = pd.read_parquet(f"{summary['stages']['evaluate']}/metrics.parquet")
    auroc = metrics[(metrics.method == "energy_temperature_3") & (metrics.dataset == "avg") & (metrics.metric == "auroc")].value.item()
    assert table.loc[1, "avg.auroc"] == pytest.approx(100 * auroc)
    assert not np.isclose(table.loc[0, "avg.auroc"], table.loc[1, "avg.auroc"], atol=0)  # T changes the scores
