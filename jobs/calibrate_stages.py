"""The calibration behind the estimates of the stages other than EMBED/FIT/SCORE
(:mod:`jobs.plan_stages`): tiny timed runs of the kernels that dominate them, on this machine and
at the job's sizes (capped), a second or so in all (a heavy model times fewer rows, or none), on
one thread.

* ``fwd_driver`` — seconds per row of a forward in the driver (batches of up to 128 rows):
  MUTANTS' accuracy checks and LCR, GAUSSIANIZE's BN pass;
* ``attr:<method>`` — seconds per image of each configured EXPLAIN method (:func:`oodlib.attribution.explain`,
  the code EXPLAIN runs; one thread, as its Ray task has);
* ``mlp_step`` — one training step (batch 128) of ERRORS' conductance detector
  (:class:`oodlib.errors.detectors.ConductanceErrorDetector`);
* ``metric_a``/``metric_b`` — a call of :func:`oodlib.metrics.failure_metrics` on n rows costs
  a + b·n (ERRORS' bootstrap);
* ``logreg_fit`` — one fit + score of VERDICTS' C2ST (the real ``permutation_test_score``, 10 fits);
* ``graph:<kind>`` — seconds per node and epoch of GRAPH's node classifier (``linear``, ``mlp``,
  ``gcn``): a proxy of :class:`oodlib.longtail.network.GraphNet` in plain torch (same layers, BN,
  dropout, Adam; the GCN's sparse aggregation over a k-regular graph), because importing
  torch-geometric alone costs the plan 1.5 s.

Missing keys (``oodlib plan`` always calibrates; the start of a run, ``quick``, does not) fall back to
:data:`jobs.plan_stages.DEFAULT_RATES`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from jobs.config import JobConfig

#: rows of the driver-forward calibration; images per EXPLAIN method (fewer for a heavy model)
FWD_ROWS, ATTR_IMAGES = 128, 8
#: the most seconds the method calibration may take (estimated from the forward), else skipped
ATTR_BUDGET_S = 1.5
#: graph proxy: at most this many nodes (the per-node cost is charged to every node)
GRAPH_NODES = 1024


def _best(fn, reps: int = 3) -> float:
    """The best of ``reps`` timed calls after a warm-up call (the best: on a shared machine a call
    can lose its CPU for longer than it runs)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _timed_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibrate_stages(cfg: JobConfig, model, sizes: dict, forward: float) -> dict[str, float]:
    """Rates (seconds) for :mod:`jobs.plan_stages`. ``sizes``: the job's sizes the kernels run at
    (``conductance_width``, ``c2st_rows``, ``c2st_dims``, ``source_rows``, ``graph_nodes``,
    ``feature_dim``, ``num_classes``); ``forward``: the EMBED calibration's seconds per row."""
    import copy

    from oodlib.device import resolve_device

    rates: dict[str, float] = {}
    device = resolve_device(cfg.model.device)
    model = copy.deepcopy(model).to(device).eval()
    threads = torch.get_num_threads()
    # one thread: short kernels on two threads time erratically on a shared machine (a thread that
    # lost its CPU stalls the other), and the stages' small ops gain little from a second one
    torch.set_num_threads(1)
    try:
        rates |= _timed_kernels(cfg, model, device, sizes, forward)
    finally:
        torch.set_num_threads(threads)
    return rates


def _timed_kernels(cfg: JobConfig, model, device, sizes: dict, forward: float) -> dict[str, float]:
    """The rates of the enabled stages' kernels."""
    rates: dict[str, float] = {}
    pre = model.preprocess
    if cfg.errors.enabled or cfg.graph.enabled:
        n = max(1, min(FWD_ROWS, int(0.1 / max(forward, 1e-6))))
        x = torch.randn(n, pre.channels, *pre.size, device=device)

        def fwd():
            with torch.inference_mode():
                model(x).argmax(1)

        rates["fwd_driver"] = _best(fwd) / n
    if cfg.explain.enabled:
        rates |= _attribution(cfg, model, device, forward)
    if cfg.errors.enabled:
        rates |= _errors(sizes)
    if cfg.verdicts.enabled:
        rates["logreg_fit"] = _logreg(sizes["c2st_rows"], sizes["c2st_dims"], cfg.verdicts.seed)
    if cfg.graph.enabled:
        g = cfg.graph
        d, c = sizes["feature_dim"], sizes["num_classes"]
        # nodes: the job's, at most GRAPH_NODES and ~0.2 GFLOP an epoch (wide features: fewer nodes, a per-node rate a little high)
        n = int(max(32, min(GRAPH_NODES, sizes["graph_nodes"], 2e8 / (6 * (d * g.hidden + g.hidden**2 + g.hidden * c)))))
        for kind in ("linear", "mlp", "gcn"):
            rates[f"graph:{kind}"] = _graph_epoch(kind, n, d, g.hidden, c, g.k)
    return rates


def _attribution(cfg: JobConfig, model, device, forward: float) -> dict[str, float]:
    """Seconds per image of each EXPLAIN method (and of ``ae``, the localization's ablations), one thread."""
    from oodlib.attribution import explain

    methods = list(dict.fromkeys([*cfg.explain.methods, *(("ae",) if cfg.explain.localization else ())]))
    n = ATTR_IMAGES
    # a method costs a few forwards+backwards (integrated gradients ~ 50): skip what would take too long
    if forward * n * 60 * len(methods) > ATTR_BUDGET_S:
        n = max(1, int(ATTR_BUDGET_S / (forward * 60 * len(methods))))
        if forward * n * 60 * len(methods) > 2 * ATTR_BUDGET_S:
            return {}
    pre = model.preprocess
    x = torch.randn(n, pre.channels, *pre.size, device=device)
    out = {}
    for m in methods:
        explain(model, x[:1], method=m)  # lazy initialization (the attribution program, hooks)
        out[f"attr:{m}"] = min(_timed_once(lambda m=m: explain(model, x, method=m)) for _ in range(2)) / n
    return out


def _errors(sizes: dict) -> dict[str, float]:
    """ERRORS: a conductance-detector training step, a failure-metrics call (a + b·n)."""
    from oodlib.errors.detectors import ConductanceErrorDetector
    from oodlib.metrics import failure_metrics

    rng = np.random.default_rng(0)
    k = max(1, int(sizes["conductance_width"]))
    x, wrong = rng.normal(size=(384, k)).astype(np.float32), np.arange(384) % 5 == 0
    # 2 epochs of 3 batches of 128 (the set-up amortized over them: a little high), the best of 3
    rates = {"mlp_step": _best(lambda: ConductanceErrorDetector(epochs=2, seed=0).fit(x, wrong), 3) / 6}
    n_small, n_big = 100, max(200, min(20000, int(sizes["source_rows"])))
    t = {}
    for n in (n_small, n_big):
        conf, correct = rng.random(n), rng.random(n) > 0.2
        t[n] = _best(lambda: [failure_metrics(conf, correct, conf) for _ in range(3)]) / 3
    b = max(0.0, (t[n_big] - t[n_small]) / (n_big - n_small))
    rates |= {"metric_a": max(0.0, t[n_small] - b * n_small), "metric_b": b}
    return rates


def _logreg(rows: int, dims: int, seed: int) -> float:
    """Seconds per fit of the C2ST (:func:`oodlib.verdicts.drift.classifier_drift_test`): its
    ``permutation_test_score`` in this process, one BLAS thread, 2 × 5 folds on ``rows`` × ``dims``
    standardized rows (random: the permutations, the bulk of the fits, are the null)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, permutation_test_score
    from threadpoolctl import threadpool_limits

    rng, rows, dims = np.random.default_rng(seed), max(10, int(rows)), max(1, int(dims))
    x, y = rng.normal(size=(rows, dims)), np.arange(rows) % 2

    def test():
        permutation_test_score(LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                               n_permutations=1, scoring="roc_auc", random_state=seed, n_jobs=1)

    with threadpool_limits(1):
        return _best(test, 2) / 10


def _graph_epoch(kind: str, n: int, d: int, hidden: int, c: int, k: int) -> float:
    """Seconds per node of one full-batch training epoch of a GraphNet-shaped classifier."""
    from torch import nn

    torch.manual_seed(0)
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    dims = [d, c] if kind == "linear" else [d, hidden, hidden, c]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if kind != "linear":
            layers.append(nn.BatchNorm1d(b))
            if i < len(dims) - 2:
                layers += [nn.ReLU(), nn.Dropout(0.6)]
    net = nn.Sequential(*layers)
    adj = None
    if kind == "gcn":  # a k-regular sparse Â (the kNN graph with its self-loops)
        import warnings

        cols = torch.randint(0, n, (n * k,))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            adj = torch.sparse_csr_tensor(torch.arange(0, n * k + 1, k), cols, torch.full((n * k,), 1.0 / k), (n, n))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def epoch():
        h = x
        for layer in net:
            if adj is not None and isinstance(layer, nn.Linear):
                h = torch.sparse.mm(adj, layer(h))  # aggregation after each GCN layer (and its transpose in backward)
            else:
                h = layer(h)
        loss = nn.functional.cross_entropy(h, y) + 0.5 * (torch.logsumexp(h, 1) - h.mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _best(epoch, 3) / n
