"""A test-only EMBED extra that records where each row was embedded: the Ray node and the GPU ids the
actor was given (``tests/jobs/test_multi_gpu.py``). Workers register it at start-up through Ray's
``worker_process_setup_hook`` (:func:`register`); it is never part of a config."""
from __future__ import annotations

import time

import numpy as np

from jobs.extras import EXTRAS, Extra


class WhereEmbedded(Extra):
    """``node_tag``: the first 6 hex digits of the node id (exact in float32); ``gpu_tag``: the
    actor's GPU ids as one number (1 + Σ 2^id); a short sleep per batch keeps the actor pool busy."""

    name = "where_embedded"
    provides = ("node_tag", "gpu_tag")

    @classmethod
    def wanted(cls, cfg):
        return None

    def __init__(self, model, params, state, device) -> None:
        super().__init__(model, params, state, device)
        self.columns = {"node_tag": None, "gpu_tag": None}

    def __call__(self, model, x, h, logits):
        import ray

        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        time.sleep(0.05)
        return {"node_tag": np.full(len(x), int(ctx.get_node_id()[:6], 16), np.float32),
                "gpu_tag": np.full(len(x), 1 + sum(2 ** int(g) for g in gpus), np.float32)}


def register() -> None:
    EXTRAS[WhereEmbedded.name] = WhereEmbedded
