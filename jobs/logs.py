"""What the job prints: oodlib's own lines (one per stage, a progress line at least every 10 s
while a stage runs), Ray's at WARNING, and known-harmless Ray noise filtered out.

``--verbose`` restores Ray Data's INFO progress and every filtered line.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import warnings

#: lines that are not problems in this job, whoever prints them (C++ core worker, raylet, Ray Data)
HARMLESS = (
    # Ray Data keeps its actors' constructor arguments (the model spec) alive for the whole pass
    b"has constructor arguments in the object store and max_restarts > 0",
    # FIT and SCORE read inside their own tasks/actors: no extra CPU is needed for reads
    b"The Ray cluster currently does not have any available CPUs. The Dataset job will hang",
    b"https://docs.ray.io/en/latest/data/data-internals.html#ray-data-and-tune",
    # actor pools start several workers at once on a small machine
    b"PYTHON worker processes have been started on node",
    b"Ray deduplicates logs by default",
    # the object store's usage dump when a worker's put waits for spilling (a small /dev/shm):
    # spilling then proceeds on its own; the dump is for debugging Ray, one line per counter
    b"Plasma Store Usage:",
    *(f"- {unit} {what}: ".encode() for what in ("spillable", "unsealed", "in use", "evictable", "created by worker",
                                                 "restored", "received", "errored") for unit in ("objects", "bytes")),
    b"Progress bars disabled. To enable, set",
)


def configure(verbose: bool = False) -> None:
    """Logging for a job run: oodlib at INFO; Ray Data at WARNING (progress bars off) unless
    ``verbose``; Python warnings that are not ours silenced; harmless stderr lines dropped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)  # a warning is one log line, not two
    if verbose:
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which SIMD build it loaded
    for name in ("ray.data", "ray._private.worker", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, module in ((FutureWarning, "torch"), (DeprecationWarning, "ray"), (UserWarning, "captum")):
        warnings.filterwarnings("ignore", category=category, module=module)
    filter_stderr(HARMLESS)


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress and execution-plan lines off (call after ``import ray``)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


_filter = None
#: written behind the last stderr bytes at exit: the filter forwards what came before it and stops
DRAINED = b"\0oodlib: stderr drained\0"


def filter_stderr(patterns: tuple[bytes, ...]) -> None:
    """Route file descriptor 2 through a thread that drops lines containing any of ``patterns``
    (C++ components write there directly, below Python's logging). At exit the pipe is drained,
    so nothing else — a traceback included — is lost."""
    global _filter
    if _filter is not None:
        return
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            done = DRAINED in pending
            if done:
                pending = pending[: pending.index(DRAINED)]
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(p in line for p in patterns))
            if out:
                os.write(original, out)
            if done:
                break
        if pending:
            os.write(original, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def drain() -> None:
        # child processes (a local Ray's raylet, GCS, workers) inherited the pipe and keep it open,
        # so the pump would never see EOF: a marker behind everything written so far ends it
        os.write(2, DRAINED)
        os.dup2(original, 2)
        thread.join(timeout=5)

    atexit.register(drain)
    _filter = thread


class Heartbeat:
    """While a stage runs, print ``[stage] running for N s: <last progress>`` every ``every``
    seconds in which the stage printed nothing itself (``note`` records progress)."""

    def __init__(self, stage: str, every: float = 10.0) -> None:
        self.stage, self.every = stage, every
        self.started = self.last = time.time()
        self.message = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{stage}", daemon=True)

    def note(self, message: str) -> None:
        self.message, self.last = message, time.time()
        print(f"[{self.stage}] {message}", flush=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = time.time()
            if now - self.last >= self.every:
                self.last = now
                print(f"[{self.stage}] running for {now - self.started:.0f} s" + (f" ({self.message})" if self.message else ""), flush=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
