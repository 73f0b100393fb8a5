"""Wrong-prediction detectors on conductance and LCR, their fusion, and the seed paper's tables.

Conventions (``specs/metrics.md``): label 1 = the model's prediction is wrong (the positive
class); every detector returns a **risk**, higher = more likely wrong. Thresholds come from the
validation split: the equal-recall threshold (recall of correct = recall of wrong) and,
optionally, the threshold at a target recall of correct (e.g. 0.98).

* :class:`ConductanceErrorDetector` — MLP 200-200 (ReLU, dropout) on standardized feature-map
  conductance vectors, BCE with ``pos_weight`` = #correct/#wrong for the class imbalance, model
  selection by validation AUROC (the paper monitors AUROC, not accuracy).
* :class:`FusionDetector` — MLP (10-10), random forest, LDA or QDA on [LCR, conductance risk].
* :func:`fit_and_evaluate` — both, plus LCR alone, into a table shaped like seed Tables 4–6.

Fitted state is a dict of NumPy arrays (npz-able); nothing is pickled: scikit-learn models are
exported to arrays and evaluated here in NumPy (tests check equality with scikit-learn).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, softmax
from sklearn.discriminant_analysis import (
    LinearDiscriminantAnalysis,
    QuadraticDiscriminantAnalysis,
)
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

from oodlib.device import resolve_device
from oodlib.metrics import (
    equal_recall_threshold,
    error_auroc,
    recalls_at,
    threshold_at_recall_correct,
)

SPLITS = ("fit", "val", "test")


def _check_labels(wrong: np.ndarray, what: str) -> np.ndarray:
    wrong = np.asarray(wrong).astype(bool).ravel()
    if wrong.all() or not wrong.any():
        raise ValueError(f"{what} needs both correct and wrong predictions (got {int(wrong.sum())} wrong of {len(wrong)})")
    return wrong


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (std floored at 1e-6 so constant columns map to 0)."""
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32)


# --- conductance error detector ---------------------------------------------------------------


class ConductanceErrorDetector:
    """MLP error detector on feature-map conductance vectors (N×K) → risk (N,) in [0, 1].

    Args:
        hidden: hidden layer widths (paper: 200, 200); ReLU and ``dropout`` after each.
        epochs, lr, weight_decay, batch_size: Adam training schedule.
        eval_every: epochs between validation AUROC checks (model selection).
        seed: seeds the initialization and the minibatch order.
    """

    name = "conductance"

    def __init__(
        self,
        hidden: tuple[int, ...] = (200, 200),
        dropout: float = 0.2,
        epochs: int = 60,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 128,
        eval_every: int = 2,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.hidden, self.dropout, self.epochs, self.lr = tuple(hidden), dropout, epochs, lr
        self.weight_decay, self.batch_size, self.eval_every, self.seed = weight_decay, batch_size, eval_every, seed
        self.device = resolve_device(device)
        self.net: torch.nn.Sequential | None = None
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.best_val_auroc_: float = float("nan")

    def _build(self, in_dim: int) -> torch.nn.Sequential:
        layers: list[torch.nn.Module] = []
        for width in self.hidden:
            layers += [torch.nn.Linear(in_dim, width), torch.nn.ReLU(), torch.nn.Dropout(self.dropout)]
            in_dim = width
        layers.append(torch.nn.Linear(in_dim, 1))
        return torch.nn.Sequential(*layers).to(self.device)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        z = (np.asarray(x, np.float32) - self.mean_) / self.std_
        return torch.as_tensor(z, device=self.device)

    def fit(
        self, x: np.ndarray, wrong: np.ndarray, x_val: np.ndarray | None = None, wrong_val: np.ndarray | None = None
    ) -> ConductanceErrorDetector:
        """Train on conductance ``x`` (N×K) with labels ``wrong`` (N,; 1 = wrong prediction).

        With a validation set, the weights of the epoch with the best validation AUROC are kept;
        otherwise the last epoch's.
        """
        wrong = _check_labels(wrong, "the conductance detector's training set")
        x = np.asarray(x, np.float32)
        self.mean_, self.std_ = _standardizer(x)
        self.best_val_auroc_ = float("nan")
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.net = self._build(x.shape[1])
        xt, yt = self._tensor(x), torch.as_tensor(wrong, dtype=torch.float32, device=self.device)
        pos_weight = torch.tensor((~wrong).sum() / wrong.sum(), dtype=torch.float32, device=self.device)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_state = None
        for epoch in range(self.epochs):
            self.net.train()
            for idx in torch.randperm(len(xt), generator=gen).to(self.device).split(self.batch_size):
                loss = loss_fn(self.net(xt[idx])[:, 0], yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if x_val is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
                auroc = error_auroc(wrong_val, self.risk(x_val))
                if not auroc <= self.best_val_auroc_:  # also true while best is NaN
                    self.best_val_auroc_ = auroc
                    best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        return self

    def risk(self, x: np.ndarray) -> np.ndarray:
        """P(wrong) per row (N,), float32."""
        if self.net is None:
            raise RuntimeError("ConductanceErrorDetector is not fitted")
        self.net.eval()
        with torch.inference_mode():
            return torch.sigmoid(self.net(self._tensor(x))[:, 0]).cpu().numpy().astype(np.float32)

    def params(self) -> dict[str, float | int | str]:
        return {
            "hidden": "-".join(map(str, self.hidden)), "dropout": self.dropout, "epochs": self.epochs, "lr": self.lr,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size, "seed": self.seed,
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """``mean``, ``std`` (K,) and ``w{i}``/``b{i}`` of each linear layer, float32."""
        linears = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        state = {"mean": self.mean_, "std": self.std_}
        for i, lin in enumerate(linears):
            state[f"w{i}"] = lin.weight.detach().cpu().numpy()
            state[f"b{i}"] = lin.bias.detach().cpu().numpy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> ConductanceErrorDetector:
        n_linear = sum(k.startswith("w") for k in state)
        self.hidden = tuple(int(state[f"w{i}"].shape[0]) for i in range(n_linear - 1))
        self.mean_, self.std_ = np.asarray(state["mean"], np.float32), np.asarray(state["std"], np.float32)
        self.net = self._build(len(self.mean_))
        linears = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for i, lin in enumerate(linears):
                lin.weight.copy_(torch.as_tensor(state[f"w{i}"]))
                lin.bias.copy_(torch.as_tensor(state[f"b{i}"]))
        self.net.eval()
        return self


def out_of_fold_risk(
    x: np.ndarray, wrong: np.ndarray, n_folds: int = 5, seed: int = 0, **detector_kwargs
) -> np.ndarray:
    """Conductance risk of every training row from a detector that did not see it (N,).

    Stratified ``n_folds``-fold cross-fitting; each fold's detector trains on the other folds for
    the full schedule (no model selection). Used to train the fusion classifiers on honest
    conductance risks instead of the detector's (overfitted) own training outputs.
    """
    wrong = _check_labels(wrong, "out-of-fold risk")
    n_folds = max(2, min(n_folds, int(wrong.sum()), int((~wrong).sum())))
    out = np.empty(len(wrong), np.float32)
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(wrong)), wrong)
    for train_idx, held_idx in folds:
        det = ConductanceErrorDetector(seed=seed, **detector_kwargs).fit(x[train_idx], wrong[train_idx])
        out[held_idx] = det.risk(x[held_idx])
    return out


# --- fusion on [LCR, conductance risk] --------------------------------------------------------

FUSION_KINDS = ("nn", "rf", "lda", "qda")


def _mlp_forward(z: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray]) -> np.ndarray:
    """scikit-learn MLPClassifier (ReLU hidden, logistic output) P(class 1) for rows z."""
    a = z.astype(np.float64)
    for w, b in zip(weights[:-1], biases[:-1]):
        a = np.maximum(a @ w + b, 0.0)
    return expit(a @ weights[-1] + biases[-1])[:, 0]


def _forest_proba(z: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    """Random-forest P(class 1): mean over trees of the leaf's class-1 fraction.

    Trees are stored flat (``left``, ``right``, ``feature``, ``threshold``, ``leaf_p1``, node
    index ``offsets`` per tree); inputs are compared as float32, as scikit-learn does.
    """
    z32 = z.astype(np.float32)
    rows = np.arange(len(z32))
    total = np.zeros(len(z32))
    offsets = state["offsets"]
    for t in range(len(offsets) - 1):
        off = offsets[t]
        node = np.zeros(len(z32), np.int64)
        while True:
            left = state["left"][off + node]
            inner = left >= 0
            if not inner.any():
                break
            go_left = z32[rows, np.maximum(state["feature"][off + node], 0)] <= state["threshold"][off + node]
            node = np.where(inner, np.where(go_left, left, state["right"][off + node]), node)
        total += state["leaf_p1"][off + node]
    return total / (len(offsets) - 1)


def _qda_proba(z: np.ndarray, s: dict[str, np.ndarray]) -> np.ndarray:
    """QDA P(class 1) from means, rotations, scalings and priors (scikit-learn's formula)."""
    logp = []
    for k in range(len(s["priors"])):
        rot, scal = s["rotations"][k], s["scalings"][k]
        proj = (z - s["means"][k]) @ (rot * scal ** -0.5)
        logp.append(-0.5 * ((proj ** 2).sum(1) + np.log(scal).sum()) + np.log(s["priors"][k]))
    return softmax(np.stack(logp, 1), axis=1)[:, 1]


class FusionDetector:
    """A second classifier on [LCR, conductance risk] (N×2) → risk (N,) in [0, 1].

    ``kind``: ``nn`` (MLP 10-10, ReLU, Adam), ``rf`` (random forest, 100 trees,
    class_weight balanced, min 5 samples per leaf), ``lda`` or ``qda`` (scikit-learn). Inputs
    are standardized on the training rows. The fitted model is exported to arrays.
    """

    def __init__(self, kind: str = "nn", seed: int = 0) -> None:
        if kind not in FUSION_KINDS:
            raise ValueError(f"unknown fusion kind {kind!r}; known: {FUSION_KINDS}")
        self.kind, self.seed = kind, seed
        self.name = f"fusion_{kind}"
        self.state: dict[str, np.ndarray] = {}
        self.estimator_ = None  # the fitted scikit-learn model (in memory only; never persisted)

    def fit(self, z: np.ndarray, wrong: np.ndarray) -> FusionDetector:
        """Fit on z (N×2: LCR, conductance risk) and ``wrong`` (N,)."""
        wrong = _check_labels(wrong, f"fusion {self.kind}")
        z = np.asarray(z, np.float64)
        mean, std = _standardizer(z)
        zs = (z - mean) / std
        state: dict[str, np.ndarray] = {"mean": mean, "std": std}
        if self.kind == "nn":
            clf = MLPClassifier((10, 10), max_iter=2000, random_state=self.seed).fit(zs, wrong)
            for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
                state[f"w{i}"], state[f"b{i}"] = w, b
        elif self.kind == "rf":
            clf = RandomForestClassifier(
                100, min_samples_leaf=5, class_weight="balanced", random_state=self.seed, n_jobs=1
            ).fit(zs, wrong)
            trees = [e.tree_ for e in clf.estimators_]
            state.update(
                offsets=np.cumsum([0] + [t.node_count for t in trees]),
                left=np.concatenate([t.children_left for t in trees]),
                right=np.concatenate([t.children_right for t in trees]),
                feature=np.concatenate([t.feature for t in trees]),
                threshold=np.concatenate([t.threshold for t in trees]),
                leaf_p1=np.concatenate([t.value[:, 0, 1] / t.value[:, 0].sum(1) for t in trees]),
            )
        elif self.kind == "lda":
            clf = LinearDiscriminantAnalysis().fit(zs, wrong)
            state.update(coef=clf.coef_[0], intercept=clf.intercept_)
        else:
            clf = QuadraticDiscriminantAnalysis(reg_param=1e-3).fit(zs, wrong)
            state.update(means=clf.means_, rotations=np.stack(clf.rotations_), scalings=np.stack(clf.scalings_), priors=clf.priors_)
        self.state, self.estimator_ = state, clf
        return self

    def risk(self, z: np.ndarray) -> np.ndarray:
        """P(wrong) per row (N,), float32."""
        if not self.state:
            raise RuntimeError(f"{self.name} is not fitted")
        s = self.state
        zs = (np.asarray(z, np.float64) - s["mean"]) / s["std"]
        if self.kind == "nn":
            n = sum(k.startswith("w") for k in s)
            p = _mlp_forward(zs, [s[f"w{i}"] for i in range(n)], [s[f"b{i}"] for i in range(n)])
        elif self.kind == "rf":
            p = _forest_proba(zs, s)
        elif self.kind == "lda":
            p = expit(zs @ s["coef"] + s["intercept"][0])
        else:
            p = _qda_proba(zs, s)
        return p.astype(np.float32)

    def params(self) -> dict[str, str | int]:
        return {"kind": self.kind, "seed": self.seed}

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, np.ndarray]) -> FusionDetector:
        self.state = {k: np.asarray(v) for k, v in state.items()}
        return self


# --- evaluation (seed Tables 3–6, Figure 4) -----------------------------------------------------


def error_table(
    risks: dict[str, tuple[np.ndarray, np.ndarray]],
    wrong_val: np.ndarray,
    wrong_test: np.ndarray,
    target_recall_correct: float | None = 0.98,
) -> pd.DataFrame:
    """One row per detector, like seed Tables 4–6.

    ``risks``: {method: (risk on val, risk on test)}. Columns: ``method``, ``val_auroc``,
    ``val_recall_correct``, ``val_recall_wrong``, ``test_auroc``, ``test_recall_correct``,
    ``test_recall_wrong`` at the equal-recall threshold fitted on val (``threshold``); with a
    ``target_recall_correct`` also the same recalls at the threshold reaching that recall of
    correct on val (suffix ``_at_target``, threshold ``threshold_at_target``).
    """
    wrong_val = _check_labels(wrong_val, "the validation split")
    wrong_test = _check_labels(wrong_test, "the test split")
    rows = []
    for method, (r_val, r_test) in risks.items():
        t = equal_recall_threshold(wrong_val, r_val)
        row = {"method": method, "threshold": t}
        for split, w, r in (("val", wrong_val, r_val), ("test", wrong_test, r_test)):
            row[f"{split}_auroc"] = error_auroc(w, r)
            row.update({f"{split}_{k}": v for k, v in recalls_at(w, r, t).items()})
        if target_recall_correct is not None:
            t2 = threshold_at_recall_correct(wrong_val, r_val, target_recall_correct)
            row["threshold_at_target"] = t2
            for split, w, r in (("val", wrong_val, r_val), ("test", wrong_test, r_test)):
                row.update({f"{split}_{k}_at_target": v for k, v in recalls_at(w, r, t2).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def to_long_metrics(table: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """An :func:`error_table` as ``metrics`` rows (task=error, method, dataset, metric, value)."""
    long = table.drop(columns=[c for c in table.columns if c.startswith("threshold")]).melt(
        id_vars="method", var_name="metric", value_name="value"
    )
    return long.assign(task="error", dataset=dataset)[["task", "method", "dataset", "metric", "value"]]


def lcr_table(entries: list[tuple[str, float, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Seed Table 3: LCR mean ± std of correct vs wrong predictions per operator and rate.

    ``entries``: (operator, rate, lcr (N,), wrong (N,)). ``lcr_difference`` is the paper's
    (mean_wrong − std_wrong) − (mean_correct + std_correct).
    """
    rows = []
    for operator, rate, lcr, wrong in entries:
        lcr, wrong = np.asarray(lcr, np.float64), _check_labels(wrong, "lcr_table")
        c, w = lcr[~wrong], lcr[wrong]
        rows.append({
            "operator": operator, "rate": float(rate),
            "correct_mean": c.mean(), "correct_std": c.std(), "wrong_mean": w.mean(), "wrong_std": w.std(),
            "lcr_difference": (w.mean() - w.std()) - (c.mean() + c.std()),
        })
    return pd.DataFrame(rows)


def auroc_vs_mutants(flips: np.ndarray, wrong: np.ndarray, counts: list[int] | None = None) -> pd.DataFrame:
    """Seed Figure 4: AUROC of the LCR over the first m mutants, for m in ``counts``.

    ``flips``: a full flip matrix (N×M bool, no early stop). Default counts: 1, 2, 5, 10, 20, …, M.
    """
    flips = np.asarray(flips, bool)
    wrong = _check_labels(wrong, "auroc_vs_mutants")
    m_total = flips.shape[1]
    if counts is None:
        counts = sorted({c for c in (1, 2, 5, *range(10, m_total + 1, 10), m_total) if c <= m_total})
    cum = np.cumsum(flips, axis=1)
    return pd.DataFrame({"mutants": counts, "auroc": [error_auroc(wrong, cum[:, m - 1] / m) for m in counts]})


def plot_auroc_vs_mutants(curves: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Write the AUROC-vs-mutants curves ({label: :func:`auroc_vs_mutants` frame}) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, df in curves.items():
        ax.plot(df["mutants"], df["auroc"], marker="o", ms=3, label=label)
    ax.set_xlabel("number of mutants")
    ax.set_ylabel("AUROC (wrong positive)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- splits and the full fit/evaluate ------------------------------------------------------------


def group_split(groups: np.ndarray, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0) -> np.ndarray:
    """Assign every row to ``fit``/``val``/``test`` by its group (N,) → split names (N,).

    All rows of a group (e.g. an image and its corrupted copies) land in the same split, so no
    evaluated image has a near-duplicate in the detector's training rows. A group's split is a
    function of ``(seed, group)`` alone — a hash of both, mapped to [0, 1) and cut by the
    cumulative ``fractions`` — so it does not move when other groups are added or quarantined
    (stages that see different row sets agree, incremental runs keep their splits); the split
    sizes match ``fractions`` up to sampling noise.
    """
    uniq, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest(), "big") / 2.0**64
                  for g in uniq])
    cuts = np.cumsum(fractions)[:-1] / np.sum(fractions)
    return np.asarray(SPLITS)[np.searchsorted(cuts, u, side="right")][inverse.reshape(-1)]


@dataclass
class ErrorDetectionResult:
    """What :func:`fit_and_evaluate` produces: the table, risks per split and method, and the
    fitted detectors (each with ``state_dict()``)."""

    table: pd.DataFrame
    risks: dict[str, dict[str, np.ndarray]]
    conductance: ConductanceErrorDetector
    fusions: dict[str, FusionDetector]


def fit_and_evaluate(
    conductance: dict[str, np.ndarray],
    lcr: dict[str, np.ndarray] | None,
    wrong: dict[str, np.ndarray],
    fusion_kinds: tuple[str, ...] = FUSION_KINDS,
    target_recall_correct: float | None = 0.98,
    seed: int = 0,
    **detector_kwargs,
) -> ErrorDetectionResult:
    """Fit every error detector on split ``fit`` and evaluate on ``val`` and ``test``.

    Inputs are dicts keyed by split (``fit``, ``val``, ``test``): conductance vectors (N×K),
    LCR (N,) (None: conductance only) and ``wrong`` labels (N,). The conductance detector
    selects its epoch by val AUROC; the fusions train on [LCR, out-of-fold conductance risk] of
    the fit split. Thresholds are fitted on val. Methods (= risk column suffixes):
    ``conductance``, ``lcr``, ``fusion_nn``, ``fusion_rf``, ``fusion_lda``, ``fusion_qda``.
    """
    det = ConductanceErrorDetector(seed=seed, **detector_kwargs).fit(
        conductance["fit"], wrong["fit"], conductance["val"], wrong["val"]
    )
    risks: dict[str, dict[str, np.ndarray]] = {"conductance": {s: det.risk(conductance[s]) for s in ("val", "test")}}
    fusions: dict[str, FusionDetector] = {}
    if lcr is not None:
        risks["lcr"] = {s: np.asarray(lcr[s], np.float32) for s in ("val", "test")}
        oof = out_of_fold_risk(conductance["fit"], wrong["fit"], seed=seed, **detector_kwargs)
        z_fit = np.column_stack([lcr["fit"], oof])
        for kind in fusion_kinds:
            fusions[kind] = FusionDetector(kind, seed).fit(z_fit, wrong["fit"])
            risks[f"fusion_{kind}"] = {
                s: fusions[kind].risk(np.column_stack([lcr[s], risks["conductance"][s]])) for s in ("val", "test")
            }
    table = error_table(
        {m: (r["val"], r["test"]) for m, r in risks.items()}, wrong["val"], wrong["test"], target_recall_correct
    )
    return ErrorDetectionResult(table, risks, det, fusions)
