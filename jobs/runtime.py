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


#: allocations of at least this many bytes are mmap'ed (glibc ``M_MMAP_THRESHOLD``), so freeing them
#: returns the pages to the system
MMAP_THRESHOLD = 1 << 20


def bound_heap() -> bool:
    """Stop glibc from keeping freed large arrays in the driver's heap.

    glibc raises its mmap threshold each time a large mmap'ed block is freed (up to 32 MiB), after
    which arrays of that size come from the heap and stay there when freed: FIT's detectors
    allocate and free tens of MiB per step (a temperature fit on 5,000 × 1,000 logits grew the
    driver by 2 GiB it never gave back). A fixed threshold keeps large arrays mmap'ed — freed,
    they leave RSS — for ~30% more CPU in such allocation-heavy loops. True when set (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to bound
        return False


def prompt_exit(code: int) -> None:
    """End the process with ``code`` once a command has returned: run the exit hooks (Ray's
    shutdown of the instance this process started, worker pools', the stderr filter's drain,
    logging's flush), then ``os._exit``. Everything a command writes is committed before it returns, so the
    interpreter's own teardown that this skips (unloading torch, torch-geometric, MLflow: 3 s
    measured after a job) has nothing left to do. Only the command-line entry points end this way."""
    import atexit
    import sys
    import threading

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    # what interpreter shutdown does first, in its order: threading's exit callbacks (e.g. joblib's
    # worker pool stopping its processes; skipped, multiprocessing's hook waits for their 300 s
    # idle timeout) and the join of non-daemon threads; then the atexit hooks
    threading._shutdown()
    atexit._run_exitfuncs()
    os._exit(code)


def init_ray():
    """Connect to ``$RAY_ADDRESS`` (or the cluster this job was submitted to), else start a fresh
    local Ray with token authentication (an owner-only token file) and every port on the loopback
    interface. Returns the ``ray`` module."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        loopback_only()
    if "ray" in sys.modules and not os.environ.get("RAY_AUTH_MODE"):
        # the driver read RAY_AUTH_MODE on import: setting it now would start a token-auth GCS the
        # driver cannot talk to; the job's own entry points (oodlib run, jobs.nightly) set it first
        log.warning("Ray was imported before init_ray() without RAY_AUTH_MODE: local Ray starts without token auth")
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is imported
    import ray

    private_token_file(create=not address)
    # a local instance keeps idle workers for a minute (Ray's default: 1 s beyond one per CPU): a
    # stage's tasks then run in the workers an earlier stage warmed, not in fresh processes that each
    # import torch, the detectors and sklearn again (seconds of CPU per process on a small job)
    local = {} if address else {"_system_config": {"idle_worker_killing_time_threshold_ms": 60_000}}
    ray.init(address=address or "local", log_to_driver=True, include_dashboard=False if not address else None, **local)
    if not os.environ.get("OODLIB_VERBOSE"):
        from jobs.logs import quiet_ray_data

        quiet_ray_data()
    return ray


def loopback_only() -> None:
    """Make a local Ray instance bind its GCS, raylet, object manager, workers, agents and
    metrics endpoints to 127.0.0.1 instead of every interface: with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes the loopback address as the node IP (its
    no-cluster mode), and its servers bind to the node IP. Only for a local instance — a cluster
    node must be reachable from the others (``cluster/README.md`` lists the ports)."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray was imported before: its module-level flag was read already
        constants.ENABLE_RAY_CLUSTER = False


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler stopping the job, ``ray job stop``) into ``SystemExit(143)`` in
    the main thread, so that cleanup runs: the MLflow run is marked FAILED, scratch space is
    removed, a local Ray instance is shut down (Ray's exit hook). SIGINT already raises
    KeyboardInterrupt."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def clean_stale_scratch(scratch_root: Path) -> None:
    """Remove the scratch directories (``{experiment}/.scratch/<id>``) of runs that are gone: their
    owner process (same host) no longer exists, or they are over a week old."""
    import json
    import shutil
    import socket
    import time

    if not scratch_root.is_dir():
        return
    for d in scratch_root.iterdir():
        try:
            owner = json.loads((d / "owner.json").read_text())
            alive = owner["host"] != socket.gethostname() or _pid_alive(owner["pid"])
        except (OSError, ValueError, KeyError):
            alive = False
        if not alive or time.time() - d.stat().st_mtime > 7 * 86400:
            shutil.rmtree(d, ignore_errors=True)


def claim_scratch(scratch: Path) -> Path:
    """Create this run's scratch directory, owned by this process."""
    import json
    import socket

    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return scratch


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
