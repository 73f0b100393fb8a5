"""Device auto-detection: CUDA when present, CPU otherwise."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for ``device``.

    ``"auto"`` (or ``None``) picks ``cuda`` when a GPU is visible, else ``cpu``; any other value
    is passed to :class:`torch.device` unchanged (``"cuda:1"``, ``"cpu"``).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
