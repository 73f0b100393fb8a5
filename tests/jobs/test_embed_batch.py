"""EMBED's per-batch contract without Ray: a row whose features or logits are not finite is
quarantined with its reason (never scored), and the other rows of the batch are unaffected."""
import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from jobs.embed_pass import embed_batch
from oodlib.data.preprocess import DIGITS_PREPROCESS
from oodlib.models.base import ModelAdapter


class Unstable(nn.Module):
    """Features (B×2) = [mean, max] of the normalized image, except that a bright image (max > 0.9)
    gives NaN features and a mid-grey image (mean in (−0.1, 0.1)) gives 3e38, which the head turns
    into ±inf logits: a stand-in for a model that is numerically unstable on some inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, peak = x.mean((1, 2, 3)), x.amax((1, 2, 3))
        h = torch.stack([mean, peak], 1)
        h = torch.where((peak > 0.9)[:, None], torch.full_like(h, float("nan")), h)
        return torch.where((mean.abs() < 0.1)[:, None], torch.full_like(h, 3e38), h)


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), value, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def test_non_finite_rows_are_quarantined_with_reason():
    backbone = Unstable()
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]]))
        head.bias.zero_()
    model = ModelAdapter("unstable", backbone, head, {"backbone": backbone}, "backbone", DIGITS_PREPROCESS).eval()
    # pixel 0 → −1 (fine), 40 → ≈ −0.69 (fine), 255 → +1 (NaN features), 128 → ≈ 0 (inf logits)
    values = [0, 255, 40, 128]
    batch = pa.table({
        "image_id": [f"img-{v}" for v in values], "dataset": ["d"] * 4, "split": ["test"] * 4, "label": pa.array([0] * 4, pa.int64()),
        "subset": [None] * 4, "batch": [None] * 4, "shard": [0] * 4, "image": pa.array([png(v) for v in values], pa.binary()), "path": [None] * 4,
    })
    out = embed_batch(model, batch, torch.device("cpu")).to_pydict()
    reason = "non-finite features, logits or extras"
    assert out["quarantine_reason"] == [None, reason, None, reason]
    assert out["pred"][1] == out["pred"][3] == -1
    feats = np.array(out["features"], np.float32)
    assert np.isnan(feats[1]).all() and np.isinf(np.array(out["logits"][3], np.float32)).any()
    # the finite rows are exactly the model's output: features [mean, max], prediction the argmax of head(h)
    for i, v in [(0, 0), (2, 40)]:
        x = (v / 255 - 0.5) / 0.5
        np.testing.assert_allclose(feats[i], [x, x], rtol=1e-6)
        assert out["pred"][i] == int(np.argmax(np.array([[1, 0], [0, 1], [10, 10]]) @ [x, x]))
