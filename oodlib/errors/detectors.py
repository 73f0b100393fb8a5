"""Wrong-prediction detectors on conductance and LCR, and their fusion.

Conventions (``specs/metrics.md``): label 1 = the model's prediction is wrong (the positive
class); every detector returns a **risk**, higher = more likely wrong.

* :class:`ErrorDetector` — the contract (:mod:`oodlib.estimator`): ``fit(x, wrong, x_val,
  wrong_val)`` returns self, :meth:`ErrorDetector.risk` gives (N,) float32.
* :class:`ConductanceErrorDetector` — MLP 200-200 (ReLU, dropout) on standardized feature-map
  conductance vectors, BCE with ``pos_weight`` = #correct/#wrong for the class imbalance, model
  selection by validation AUROC (the paper monitors AUROC, not accuracy).
* :class:`FusionDetector` — MLP (10-10), random forest, LDA or QDA on [LCR, conductance risk].

Fitted state is arrays only (one safetensors file via :meth:`~oodlib.estimator.Estimator.save`);
nothing is pickled: scikit-learn models are exported to arrays and evaluated here in NumPy
(tests check equality with scikit-learn).
"""
from __future__ import annotations

import numpy as np
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
from oodlib.estimator import Estimator
from oodlib.metrics import error_auroc

FUSION_KINDS = ("nn", "rf", "lda", "qda")


def _check_labels(wrong: np.ndarray, what: str) -> np.ndarray:
    wrong = np.asarray(wrong).astype(bool).ravel()
    if wrong.all() or not wrong.any():
        raise ValueError(f"{what} needs both correct and wrong predictions (got {int(wrong.sum())} wrong of {len(wrong)})")
    return wrong


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (std floored at 1e-6 so constant columns map to 0)."""
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32)


class ErrorDetector(Estimator):
    """Base class of the wrong-prediction detectors: ``fit(x, wrong, x_val, wrong_val)`` → self,
    ``risk(x)`` → (N,) float32, higher = more likely wrong. Subclasses implement ``fit`` and
    ``_risk``."""

    def fit(
        self, x: np.ndarray, wrong: np.ndarray, x_val: np.ndarray | None = None, wrong_val: np.ndarray | None = None
    ) -> ErrorDetector:
        raise NotImplementedError

    def risk(self, x: np.ndarray) -> np.ndarray:
        """Risk of a wrong prediction per row (N,), float32."""
        self.check_fitted()
        x = np.asarray(x)
        r = np.asarray(self._risk(x))
        if r.shape != (len(x),):
            raise ValueError(f"{type(self).__name__}._risk returned shape {r.shape}, expected ({len(x)},)")
        return r.astype(np.float32)

    def _risk(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# --- conductance error detector ---------------------------------------------------------------


class ConductanceErrorDetector(ErrorDetector):
    """MLP error detector on feature-map conductance vectors (N×K) → risk (N,) in [0, 1].

    Args:
        hidden: hidden layer widths (paper: 200, 200); ReLU and ``dropout`` after each.
        epochs, lr, weight_decay, batch_size: Adam training schedule.
        eval_every: epochs between validation AUROC checks (model selection).
        seed: seeds the initialization and the minibatch order.
        device: torch device (``"auto"``: CUDA when present).

    Fitted: ``mean_``, ``std_`` (K,) standardizer; ``weights_`` {``w{i}``, ``b{i}``} of each
    linear layer (float32); ``best_val_auroc_`` (NaN without a validation set).
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
        self.device = device

    @property
    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _layers(self, dims: list[int], linear) -> torch.nn.Sequential:
        """Linear (ReLU, Dropout) … Linear through the widths ``dims`` (input, hidden…, 1)."""
        layers: list[torch.nn.Module] = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1]):
            layers += [linear(d_in, d_out), torch.nn.ReLU(), torch.nn.Dropout(self.dropout)]
        layers.append(linear(dims[-2], dims[-1]))
        return torch.nn.Sequential(*layers).to(self._device)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        z = (np.asarray(x, np.float32) - self.mean_) / self.std_
        return torch.as_tensor(z, device=self._device)

    def fit(
        self, x: np.ndarray, wrong: np.ndarray, x_val: np.ndarray | None = None, wrong_val: np.ndarray | None = None
    ) -> ConductanceErrorDetector:
        """Train on conductance ``x`` (N×K) with labels ``wrong`` (N,; 1 = wrong prediction).

        With a validation set, the weights of the epoch with the best validation AUROC are kept;
        otherwise the last epoch's.
        """
        wrong = _check_labels(wrong, "the conductance detector's training set")
        x = np.asarray(x, np.float32)
        for k in list(self.fitted_attributes()):
            delattr(self, k)
        self.mean_, self.std_ = _standardizer(x)
        self.best_val_auroc_ = float("nan")
        device = self._device
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        net = self._net = self._layers([x.shape[1], *self.hidden, 1], torch.nn.Linear)
        xt, yt = self._tensor(x), torch.as_tensor(wrong, dtype=torch.float32, device=device)
        pos_weight = torch.tensor((~wrong).sum() / wrong.sum(), dtype=torch.float32, device=device)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_state = None
        for epoch in range(self.epochs):
            net.train()
            for idx in torch.randperm(len(xt), generator=gen).to(device).split(self.batch_size):
                loss = loss_fn(net(xt[idx])[:, 0], yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if x_val is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
                auroc = error_auroc(wrong_val, self.risk(x_val))
                if not auroc <= self.best_val_auroc_:  # also true while best is NaN
                    self.best_val_auroc_ = auroc
                    best_state = {k: v.clone() for k, v in net.state_dict().items()}
        if best_state is not None:
            net.load_state_dict(best_state)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        self.weights_ = {}
        for i, lin in enumerate(linears):
            self.weights_[f"w{i}"] = lin.weight.detach().cpu().numpy().copy()
            self.weights_[f"b{i}"] = lin.bias.detach().cpu().numpy().copy()
        self._restore()
        return self

    def _restore(self) -> None:
        """``_net`` (eval mode) from ``weights_``; its shapes come from the weights."""
        n = sum(k.startswith("w") for k in self.weights_)
        dims = [int(self.weights_["w0"].shape[1])] + [int(self.weights_[f"w{i}"].shape[0]) for i in range(n)]
        net = self._layers(dims, lambda i, o: torch.nn.utils.skip_init(torch.nn.Linear, i, o))  # no RNG draws
        with torch.no_grad():
            for i, lin in enumerate(m for m in net if isinstance(m, torch.nn.Linear)):
                lin.weight.copy_(torch.as_tensor(np.asarray(self.weights_[f"w{i}"], np.float32)))
                lin.bias.copy_(torch.as_tensor(np.asarray(self.weights_[f"b{i}"], np.float32)))
        self.mean_, self.std_ = np.asarray(self.mean_, np.float32), np.asarray(self.std_, np.float32)
        self._net = net.eval()

    def _risk(self, x: np.ndarray) -> np.ndarray:
        """P(wrong) per row (N,)."""
        self._net.eval()
        with torch.inference_mode():
            return torch.sigmoid(self._net(self._tensor(x))[:, 0]).cpu().numpy()


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


class FusionDetector(ErrorDetector):
    """A second classifier on [LCR, conductance risk] (N×2) → risk (N,) in [0, 1].

    ``kind``: ``nn`` (MLP 10-10, ReLU, Adam), ``rf`` (random forest, 100 trees,
    class_weight balanced, min 5 samples per leaf), ``lda`` or ``qda`` (scikit-learn). Inputs
    are standardized on the training rows. The fitted model is exported to arrays (``model_``:
    ``mean``, ``std`` and the kind's arrays); the scikit-learn model itself stays in memory only
    (``_sklearn``, after ``fit``; never persisted).
    """

    name = "fusion"

    def __init__(self, kind: str = "nn", seed: int = 0) -> None:
        if kind not in FUSION_KINDS:
            raise ValueError(f"unknown fusion kind {kind!r}; known: {FUSION_KINDS}")
        self.kind, self.seed = kind, seed

    @classmethod
    def contract_variants(cls) -> list[dict]:
        return [{"kind": k} for k in FUSION_KINDS]

    def fit(
        self, x: np.ndarray, wrong: np.ndarray, x_val: np.ndarray | None = None, wrong_val: np.ndarray | None = None
    ) -> FusionDetector:
        """Fit on x (N×2: LCR, conductance risk) and ``wrong`` (N,); ``x_val``/``wrong_val`` are
        not used."""
        wrong = _check_labels(wrong, f"fusion {self.kind}")
        z = np.asarray(x, np.float64)
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
        self.model_ = state
        self._restore()
        self._sklearn = clf
        return self

    def _restore(self) -> None:
        # a scikit-learn model from an earlier fit does not describe a loaded state
        self.__dict__.pop("_sklearn", None)

    def _risk(self, x: np.ndarray) -> np.ndarray:
        """P(wrong) per row (N,)."""
        s = self.model_
        zs = (np.asarray(x, np.float64) - s["mean"]) / s["std"]
        if self.kind == "nn":
            n = sum(k.startswith("w") for k in s)
            return _mlp_forward(zs, [s[f"w{i}"] for i in range(n)], [s[f"b{i}"] for i in range(n)])
        if self.kind == "rf":
            return _forest_proba(zs, s)
        if self.kind == "lda":
            return expit(zs @ s["coef"] + s["intercept"][0])
        return _qda_proba(zs, s)
