"""Has the incoming data drifted from the ID validation data? Two two-sample tests.

* :func:`classifier_drift_test` — a classifier two-sample test (C2ST; Lopez-Paz & Oquab, ICLR 2017)
  on the feature vectors: a logistic regression on standardized features learns to tell incoming
  rows from ID-val rows; its cross-validated ROC AUC is the statistic (0.5 = indistinguishable)
  and the p-value comes from a permutation test (the same pipeline refitted on ``n_permutations``
  shufflings of the source labels: p = (1 + #{AUC_perm ≥ AUC}) / (1 + n_permutations), exact
  under the null of exchangeable rows, never below 1/(1 + n_permutations)). It sees
  multivariate shifts a per-feature test misses and costs (n_permutations + 1)·cv small fits.
* :func:`ks_drift_test` — the two-sample Kolmogorov–Smirnov test on one scalar (the primary OOD
  score), ``scipy.stats.ks_2samp``: cheap, exact for small samples, and it reads directly as "the
  score distribution moved". With many tied scores (e.g. a saturated MSP) it is conservative.

Why these and not a drift library: both are a few lines on scikit-learn and SciPy, which the
project already depends on, are maintained, seeded and deterministic. alibi-detect (0.13.0, the
current release) would be the obvious library, but its base install pins ``numpy<2``,
``pandas<3``, ``Pillow<11`` and ``scikit-image<0.25`` — incompatible with this project's NumPy 2
/ pandas 3 — and pulls transformers, opencv-python, numba and dill; its learned-classifier and
MMD detectors further need its TensorFlow extra (``tensorflow<2.19``, ``tensorflow_probability``,
``tf-keras``) or PyTorch/KeOps backends. (Read from its wheel's ``Requires-Dist`` metadata.)

Feed the C2ST the penultimate features, not the logits: on the digits incoming batches
(:mod:`oodlib.data.incoming`, 120 images) a C2ST on the 8 logits misses a 45% share of near-OOD
and corrupted digits (AUC 0.48, p = 0.75) that one on the 64 penultimate features finds (AUC 0.71,
p = 0.0099, the smallest possible with 100 permutations) — a linear classifier on logits sees little
of a shift that moves images *between* the ID classes' logit regions.

Both functions return a :class:`DriftTest`; subsampling (``max_rows`` per side) is seeded, so a
result is a deterministic function of the inputs and the seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class DriftTest:
    """One two-sample test of incoming vs reference rows.

    ``test``: ``c2st`` (statistic = cross-validated ROC AUC of reference-vs-incoming, 0.5 = no
    drift) or ``ks`` (statistic = the KS distance D in [0, 1]); ``p_value``: small = drift;
    ``n_reference``/``n_incoming``: rows actually used (after subsampling)."""

    test: str
    statistic: float
    p_value: float
    n_reference: int
    n_incoming: int

    def to_dict(self) -> dict:
        return asdict(self)


def _subsample(x: np.ndarray, max_rows: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_rows is None or len(x) <= max_rows:
        return x
    return x[np.sort(rng.choice(len(x), size=max_rows, replace=False))]


def classifier_drift_test(reference, incoming, max_rows: int | None = 1000, n_permutations: int = 200,
                          cv: int = 5, C: float = 1.0, seed: int = 0, max_dims: int | None = 64, n_jobs: int = 1) -> DriftTest:
    """C2ST of ``incoming`` (M×D features) against ``reference`` (N×D, e.g. ID-val features).

    Each side is subsampled to at most ``max_rows`` rows (seeded). Features wider than
    ``max_dims`` are first projected on the pooled rows' top ``max_dims`` principal components:
    the projection ignores which side a row is on, so the permutation test stays exact, and the
    (n_permutations + 1)·cv fits stay cheap for 2048-d ImageNet features. The classifier is
    ``LogisticRegression(C)`` on features standardized over the pooled rows, scored by ROC AUC over a seeded
    ``StratifiedKFold(cv)`` (fewer folds when a side has fewer than ``cv`` rows);
    ``sklearn.model_selection.permutation_test_score`` gives the p-value. ``n_permutations`` bounds
    the smallest p-value: 1/(1 + n_permutations) — keep it well above 1/alpha. ``n_jobs``: joblib
    processes for the permutations (the same result for any value).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, permutation_test_score
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    ref = np.asarray(reference, np.float64)
    inc = np.asarray(incoming, np.float64)
    ref = ref.reshape(len(ref), -1)
    inc = inc.reshape(len(inc), -1)
    if ref.shape[1] != inc.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]} features, incoming {inc.shape[1]}")
    if not (np.isfinite(ref).all() and np.isfinite(inc).all()):
        raise ValueError("features contain NaN or Inf")
    rng = np.random.default_rng(seed)
    ref, inc = _subsample(ref, max_rows, rng), _subsample(inc, max_rows, rng)
    folds = min(cv, len(ref), len(inc))
    if folds < 2:
        raise ValueError(f"need at least 2 rows on each side, got {len(ref)} reference and {len(inc)} incoming")
    x = np.vstack([ref, inc])
    if max_dims is not None and x.shape[1] > max_dims:
        from sklearn.decomposition import PCA

        x = PCA(n_components=min(max_dims, len(x)), random_state=seed).fit_transform(x)
    # standardized on the pooled rows, like the projection: label-blind, so the test stays exact, and
    # the (n_permutations + 1)·cv fits skip a pipeline's clone-and-fit overhead (~30% of their time)
    x = StandardScaler().fit_transform(x)
    y = np.r_[np.zeros(len(ref), int), np.ones(len(inc), int)]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # hundreds of small fits: one BLAS thread each (same result for any n_jobs: each permutation's
    # shuffle comes from the seeded generator up front)
    with threadpool_limits(1):
        auc, _, p = permutation_test_score(LogisticRegression(C=C, max_iter=2000), x, y, cv=splitter,
                                           n_permutations=n_permutations, scoring="roc_auc", random_state=seed,
                                           n_jobs=n_jobs)
    return DriftTest("c2st", float(auc), float(p), len(ref), len(inc))


def ks_drift_test(reference_scores, incoming_scores) -> DriftTest:
    """Two-sample KS test (two-sided, ``method="auto"``) of incoming vs reference scores (1-D)."""
    from scipy.stats import ks_2samp

    from oodlib.metrics import check_two_samples

    ref, inc = check_two_samples(reference_scores, incoming_scores, ("reference", "incoming"))
    res = ks_2samp(ref, inc)
    return DriftTest("ks", float(res.statistic), float(res.pvalue), len(ref), len(inc))
