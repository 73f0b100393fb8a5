"""EVALUATE's metric rows: per OOD set, per named group (OpenOOD's near/far) and ``avg``."""
import numpy as np
import pandas as pd
import pytest

from oodlib.evaluation import ood_metric_rows
from oodlib.metrics import OOD_METRICS, ood_metrics


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    parts = [("id", "test", rng.normal(2, 1, 200))] + [(f"o{i}", "test", rng.normal(i * 0.5, 1, 80 + 10 * i)) for i in range(4)]
    frames = [pd.DataFrame({"dataset": d, "split": s, "score_a": v, "score_b": -np.abs(v)}) for d, s, v in parts]
    return pd.concat(frames, ignore_index=True)


def test_group_rows_are_the_mean_of_their_sets():
    scores = _scores()
    groups = {"near": ["o2", "o3"], "far": ["o0", "o1", "o3"]}
    rows = pd.DataFrame(ood_metric_rows(scores, "id", ["o0", "o1", "o2", "o3"], groups))
    for method in ("a", "b"):
        m = rows[rows.method == method]
        assert list(m.dataset.drop_duplicates()) == ["o0", "o1", "o2", "o3", "near", "far", "avg"]  # the printed order
        per_set = {d: ood_metrics(scores[(scores.dataset == "id")][f"score_{method}"], scores[scores.dataset == d][f"score_{method}"])
                   for d in ("o0", "o1", "o2", "o3")}
        for name, members in {**groups, "avg": ["o0", "o1", "o2", "o3"]}.items():
            for k in OOD_METRICS:
                got = m[(m.dataset == name) & (m.metric == k)].value.item()
                assert got == pytest.approx(np.mean([per_set[s][k] for s in members]))
    without = pd.DataFrame(ood_metric_rows(scores, "id", ["o0", "o1", "o2", "o3"]))
    assert set(without.dataset) == {"o0", "o1", "o2", "o3", "avg"}


@pytest.mark.parametrize("groups", [{"near": ["o9"]}, {"avg": ["o0"]}, {"o1": ["o0"]}, {"near": []}])
def test_bad_groups_rejected(groups):
    with pytest.raises(ValueError, match="OOD group"):
        ood_metric_rows(_scores(), "id", ["o0", "o1", "o2", "o3"], groups)
