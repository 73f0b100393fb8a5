"""How the command-line entry points end (jobs.runtime.prompt_exit): exit hooks run, the code is
kept, and nothing written to stdout or the filtered stderr is lost."""
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
