"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``); extra arguments (e.g. ``--quick``)
are passed to each. Exits non-zero if a benchmark script fails to run."""
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
failed = []
for script in sorted(here.glob("bench_*.py")):
    print(f"\n## {script.name}\n", flush=True)
    if subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"benchmarks that failed to run: {failed}")
