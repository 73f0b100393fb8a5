"""Temperature scaling (Guo et al. 2017): MSP of z/T, T fitted on ID-val logits by NLL."""
from __future__ import annotations

import numpy as np
from scipy.special import softmax

from oodlib.detectors._util import require_rows
from oodlib.detectors.base import Detector, Head, ScoreInputs


def fit_temperature(logits: np.ndarray, labels: np.ndarray, init: float = 1.5, lr: float = 0.01,
                    max_iter: int = 50) -> float:
    """T minimising the mean NLL of softmax(z/T) the way OpenOOD and pytorch-ood do it: one
    ``torch.optim.LBFGS(lr, max_iter).step`` from T = ``init``, in float32 (so after 50 small steps
    T is near, not at, the optimum). Rows with a label < 0 are ignored (pytorch-ood)."""
    import torch
    from torch.nn.functional import log_softmax, nll_loss

    labels = np.asarray(labels, np.int64)
    known = labels >= 0
    if not known.any():
        raise ValueError("temperature scaling needs labelled ID rows (the ID val split); got none")
    z = torch.from_numpy(np.ascontiguousarray(logits[known], np.float32))
    y = torch.from_numpy(labels[known])
    t = torch.nn.Parameter(torch.tensor(float(init)))
    optimizer = torch.optim.LBFGS([t], lr=lr, max_iter=max_iter)

    def closure():
        optimizer.zero_grad()
        loss = nll_loss(log_softmax(z / t, dim=1), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(t.detach())


class TempScale(Detector):
    """Score = max_k softmax(z/T)_k; T fitted on the **ID-val** logits by NLL.

    T starts at ``init_temperature`` (OpenOOD: 1.5; pytorch-ood's ``TemperatureScaling``: 1.0)
    and takes one L-BFGS step (lr 0.01, 50 iterations), as both peers do.

    :see Implementation: `OpenOOD <https://github.com/Jingkang50/OpenOOD/blob/3c35632/openood/postprocessors/temp_scaling_postprocessor.py>`__
    """

    name = "tempscale"
    fit_needs = ("bank",)
    fit_split = "val"

    def __init__(self, init_temperature: float = 1.5) -> None:
        self.init_temperature = float(init_temperature)

    def fit(self, features: np.ndarray, labels: np.ndarray, head: Head) -> "TempScale":
        features = require_rows(features, "TempScale")
        self.temperature_ = fit_temperature(head.logits(features), labels, self.init_temperature)
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return softmax(np.asarray(inputs.logits, np.float64) / self.temperature_, axis=1).max(axis=1)
