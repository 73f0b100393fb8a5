"""RankFeat (Song et al., NeurIPS 2022): energy after removing the rank-1 component of feature maps.

EMBED computes the score itself (:class:`oodlib.layers.RankFeat`, the ``rankfeat`` column): per
layer l in ``layers`` the C×HW map minus σ₁u₁v₁ᵀ (the exact top singular pair — from a float64
eigensolver on the smaller Gram matrix, :func:`oodlib.layers.remove_rank1`, rather than the
authors' float32 SVD: the same component, faster) runs through the rest of the network
to logits zₗ, and score = T·logsumexp(mean over layers of zₗ / T). The default layers are the last
block and the one before (layer4, layer3 for ResNets): the authors' logit-space fusion.

:see Implementation: KingJamesSong/RankFeat@1c0de9c ``test_ood_resnetv2.py``
(``iterate_data_rankfeat``); Jingkang50/OpenOOD@3c35632 ``openood/postprocessors/rankfeat_postprocessor.py``
(``accelerate: False``, ``temperature: 1``).

One layer = pytorch-ood's ``RankFeat`` with its default energy (which returns −score, T = 1).
"""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Detector, ScoreInputs
from oodlib.detectors.columns import as_tuple


class RankFeat(Detector):
    """Reads the per-image ``rankfeat`` column computed in EMBED (nothing to fit)."""

    name = "rankfeat"
    requires = ("rankfeat",)

    def __init__(self, layers: list[str] | str | None = None, temperature: float = 1.0) -> None:
        self.layers = as_tuple(layers)
        self.temperature = float(temperature)

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        return np.asarray(inputs.extras["rankfeat"], np.float32)
