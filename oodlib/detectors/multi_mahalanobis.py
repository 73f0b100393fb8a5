"""Multi-layer Mahalanobis (Lee et al., NeurIPS 2018): a weighted sum of per-layer Mahalanobis
confidences on spatially averaged feature maps.

EMBED writes the ``layer_means`` column (:class:`oodlib.layers.LayerMeans`). FIT fits, per layer,
the class means μₗₖ and the tied covariance Σₗ (1/N, true labels; Σₗ⁻¹ by
:func:`oodlib.stats.precision_matrix`) on the ID-train rows, and

    score = Σₗ αₗ·Mₗ,   Mₗ = maxₖ −½ (zₗ−μₗₖ)ᵀ Σₗ⁻¹ (zₗ−μₗₖ)   (higher = more ID).

:see Implementation: Jingkang50/OpenOOD@3c35632 ``openood/postprocessors/mds_ensemble_postprocessor.py``
(``get_MDS_stat``, ``compute_Mahalanobis_score`` with ``feature_type: mean``, ``alpha_list``).

Deviation: no input preprocessing (ε = 0, as pytorch-ood's ``MultiMahalanobis``). The original's
x̃ = x − ε·sign(∇ₓ ½dŷ(x)) needs the fitted means and precisions while the image is in memory,
i.e. a second image pass after FIT; EMBED runs before FIT. pytorch-ood returns −s computed with
an unnormalised covariance sum (+10⁻⁶·I), i.e. s·N up to that ridge.
"""
from __future__ import annotations

import numpy as np

from oodlib.detectors.base import Head, ScoreInputs
from oodlib.detectors.columns import (
    ColumnFitted,
    as_tuple,
    layer_blocks,
    per_layer,
    random_layer_columns,
)
from oodlib.detectors.mahalanobis import min_mahalanobis
from oodlib.stats import ClassMoments, precision_matrix


class MultiMahalanobis(ColumnFitted):
    """Score = Σₗ αₗ maxₖ −½ dₗₖ from the ``layer_means`` column (see the module docstring).

    ``layers`` sets what EMBED computes (None: the model's defaults, :data:`oodlib.layers.DEFAULT_LAYERS`);
    ``alpha``: the layer weights, one per layer (None: 1 each); lists or comma-separated strings.
    """

    name = "multi_mahalanobis"
    requires = ("layer_means", "layer_means_sizes")
    fit_columns = ("layer_means", "layer_means_sizes")

    def __init__(self, layers: list[str] | str | None = None, alpha: list[float] | str | None = None) -> None:
        self.layers = as_tuple(layers)
        self.alpha = as_tuple(alpha, float)

    @classmethod
    def contract_extras(cls, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return random_layer_columns("layer_means", [3, 5], n, rng)

    def _fit(self, features, labels, head: Head, extras) -> "MultiMahalanobis":
        blocks = layer_blocks(extras["layer_means"], extras["layer_means_sizes"], self.name)
        num_classes = head.W.shape[0]
        self.weights_ = per_layer(1.0 if self.alpha is None else self.alpha, len(blocks), "alpha", self.name)
        if self.alpha is not None and len(self.alpha) != len(blocks):
            raise ValueError(f"detector {self.name!r}: {len(self.alpha)} weights `alpha` for {len(blocks)} layers")
        self.means_, self.precisions_ = {}, {}
        for l, z in enumerate(blocks):
            m = ClassMoments.from_batch(z, labels, num_classes, second=True)
            self.means_[str(l)] = m.means
            self.precisions_[str(l)] = precision_matrix(m.tied_covariance(), f"multi_mahalanobis: the tied covariance of layer {l}")
        self.sizes_ = np.array([b.shape[1] for b in blocks])
        return self

    def _score(self, inputs: ScoreInputs) -> np.ndarray:
        blocks = layer_blocks(inputs.extras["layer_means"], inputs.extras["layer_means_sizes"], self.name, self.sizes_)
        return sum(-0.5 * w * min_mahalanobis(z, self.means_[str(l)], self.precisions_[str(l)])
                   for l, (w, z) in enumerate(zip(self.weights_, blocks)))
