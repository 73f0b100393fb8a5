"""The driver's heap bound (jobs.runtime.bound_heap): arrays a detector fit frees leave the RSS."""
import subprocess
import sys

import pytest

CHILD = """
import sys
import numpy as np, psutil
if sys.argv[1] == "bounded":
    from jobs.runtime import bound_heap
    assert bound_heap()
from oodlib.detectors.tempscale import fit_temperature
rss = lambda: psutil.Process().memory_info().rss
rng = np.random.default_rng(0)
z = rng.standard_normal((1000, 1000)).astype(np.float32)
y = rng.integers(0, 1000, len(z))
fit_temperature(z[:10], y[:10])  # torch's one-time set-up
base = rss()
fit_temperature(z, y)  # 50 L-BFGS evaluations, each allocating and freeing ~4 MiB tensors
print((rss() - base) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_fit_returns_what_it_freed_under_the_heap_bound():
    grown = {mode: float(subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout)
             for mode in ("default", "bounded")}
    assert grown["bounded"] < 30, grown  # MiB kept after the fit
    assert grown["default"] > 150, grown  # what the bound is for: glibc alone kept ~300 MiB of freed tensors
