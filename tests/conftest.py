"""Shared fixtures. Everything runs on CPU; the digits model trains once per cache (seconds)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Ray token auth on for every Ray the tests start or talk to (read by Ray when it is imported)
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray gives a new GCS 30 s to bind its port; on a busy 2-core machine (a previous test's Ray still
# shutting down) that has run out in the fault-tolerance tests' Cluster start. Ray's own knob:
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits_sets():
    """Every image set of the embedded benchmark (seed 0), as :class:`oodlib.data.digits.ImageSet`."""
    from oodlib.data.digits import build_digits

    return {(s.dataset, s.split): s for s in build_digits(0)}


@pytest.fixture(scope="session")
def digits_model():
    """The trained digits-cnn (eval mode, CPU)."""
    from oodlib.models.digits_cnn import trained_digits_cnn

    return trained_digits_cnn()


@pytest.fixture(scope="session")
def digits_inputs(digits_sets, digits_model):
    """Decoded, normalized inputs and labels per (dataset, split): {key: (x N×1×32×32, labels N)}."""
    from oodlib.data.decode import decode_batch
    from oodlib.data.manifest import encode_png

    out = {}
    for key, s in digits_sets.items():
        x, _ = decode_batch([encode_png(im) for im in s.images], [None] * len(s.images), digits_model.preprocess)
        out[key] = (x, np.asarray(s.labels))
    return out
