"""Start-up cost of the CLI: seconds from the command to the first job's work, and ``--help``.

    python scripts/bench/startup.py                 # 3 repeats each, this checkout's robustsweep
    python scripts/bench/startup.py --repeats 5 --cwd /tmp/elsewhere

"First job's work" is the first log line of a job's data step (``data <name>: ... test images``):
before it come Python, Hydra (plugin scan, composition), the validating sweeper (every job composed
and validated), the MLflow store and parent run, and the job's own imports and run set-up. A fresh
store is used each time (its creation and schema migration count: a user's first sweep pays it).
Prints one line per measurement and the medians; writes nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("startup")
FIRST_WORK = re.compile(r"data \S+: \d+ test images")


def time_to_line(cmd: list[str], cwd: Path, pattern: re.Pattern[str] | None) -> float:
    """Seconds until a line of the command's output matches ``pattern`` (None: until it exits)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if pattern is not None and pattern.search(line):
            t = time.perf_counter() - t0
            p.kill()
            p.wait()
            return t
    p.wait()
    if pattern is not None:
        raise RuntimeError(f"{' '.join(cmd)}: no line matched {pattern.pattern} (exit {p.returncode})")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cwd", type=Path, default=None, help="launch directory (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = [sys.executable, "-m", "robustsweep"]
    sweep = [*base, "-m", "experiment=quickstart", "sparsity=0,0.5", "epsilon=0.1"]
    results: dict[str, list[float]] = {"command -> first job's work": [], "--help": []}
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cwd = args.cwd or Path(tmp)
            results["command -> first job's work"].append(
                time_to_line([*sweep, f"paths.output_dir={tmp}/o", f"tracking.uri=sqlite:///{tmp}/o/m.db"],
                             cwd, FIRST_WORK))
            results["--help"].append(time_to_line([*base, "--help"], cwd, None))
        log.info("repeat %d: %s", i + 1, ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()))
    for k, v in results.items():
        log.info("%-28s median %.2f s (min %.2f, max %.2f, n=%d)", k, statistics.median(v), min(v),
                 max(v), len(v))


if __name__ == "__main__":
    main()
