"""How the command-line entry points end (jobs.runtime.prompt_exit): exit hooks run, the code is
kept, and nothing written to stdout or the filtered stderr is lost."""
import fcntl
import os
import signal
import subprocess
import sys
import time

CHILD = """
import atexit, os, sys
from jobs.logs import filter_stderr
filter_stderr((b"drop me",))
atexit.register(lambda: print("hook ran"))
print("stdout line", end="")  # unflushed, no newline
sys.stderr.write("kept\\ndrop me\\n")
os.write(2, b"raw kept, no newline")
from jobs.runtime import prompt_exit
prompt_exit(3)
print("never")
"""


def test_prompt_exit_runs_hooks_and_loses_no_output():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert r.stdout == "stdout linehook ran\n"
    assert r.stderr == "kept\nraw kept, no newline"


def test_prompt_exit_stops_worker_pools_like_interpreter_shutdown():
    # joblib's reusable process pool (the C2ST's permutations use it) stops its workers from a
    # threading exit callback; without that, multiprocessing's exit hook waits out their 300 s idle timeout
    child = """
from joblib import Parallel, delayed
print(Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)))
from jobs.runtime import prompt_exit
prompt_exit(0)
"""
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and r.stdout == "[0, 1, 2, 3]\n", r.stderr
    assert time.monotonic() - started < 60


def test_filtered_stderr_drains_without_waiting_for_child_processes():
    # a local Ray's raylet, GCS and workers inherit the filter's pipe and keep it open: the drain at
    # exit must not wait for them to close it (it waited out a 5 s timeout at the end of every run)
    child = """
import subprocess, sys
from jobs.logs import filter_stderr
filter_stderr((b"drop me",))
holder = subprocess.Popen(["sleep", "60"])  # inherits fd 2, the pipe's write end
sys.stderr.write("last words\\n")
print("ready", holder.pid, flush=True)
from jobs.runtime import prompt_exit
prompt_exit(0)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    word, holder = proc.stdout.readline().split()
    try:
        assert word == "ready"
        ready = time.monotonic()
        proc.wait(timeout=60)
        assert time.monotonic() - ready < 3  # not the drain's 5 s timeout
        assert proc.returncode == 0
    finally:
        os.kill(int(holder), signal.SIGTERM)  # the sleeper only, not any other ``sleep 60``
    # stderr stays open while the sleeper holds it: read what reached it so far
    fcntl.fcntl(proc.stderr, fcntl.F_SETFL, fcntl.fcntl(proc.stderr, fcntl.F_GETFL) | os.O_NONBLOCK)
    assert (proc.stderr.read() or "") == "last words\n"
