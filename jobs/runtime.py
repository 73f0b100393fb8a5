"""Ray start-up for the job's driver: connect to the cluster, or start local Ray with token auth."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("oodlib.runtime")


def private_token_file(path: Path | None = None, create: bool = True) -> Path | None:
    """Make the default Ray token file (``~/.ray/auth_token``) owner-only.

    Ray writes a generated token with the process umask (often world-readable), and whoever can
    read it can run code on the cluster. With no token given by ``$RAY_AUTH_TOKEN`` or
    ``$RAY_AUTH_TOKEN_PATH``, this creates the file with mode 0600 when it is missing and ``create``
    (256 random bits, as Ray generates them; not when joining a cluster, whose token must be given)
    and removes group/other access when it has any. Returns the file it manages, or None when the
    token comes from the environment.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = path or Path.home() / ".ray" / "auth_token"
    if not create and not path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by other users; restricting it to its owner (0600)", path)
            path.chmod(0o600)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def init_ray():
    """Connect to ``$RAY_ADDRESS`` (or the cluster this job was submitted to), else start local Ray
    with token authentication (an owner-only token file). Returns the ``ray`` module."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        address = os.environ.get("RAY_ADDRESS")
        private_token_file(create=not address)
        ray.init(address=address or None, log_to_driver=True, include_dashboard=False if not address else None)
    return ray
