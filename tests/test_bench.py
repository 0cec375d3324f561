"""The benchmark in its small mode (digits + small CNN): it runs end to end and writes valid JSON.

No speed is asserted (speed is what the benchmark reports, on whatever machine runs it); what is
checked is that every section produced its figures, so a broken benchmark fails CI.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "bench.py"


def test_small_benchmark_runs_and_writes_valid_json(tmp_path):
    out = tmp_path / "outputs" / "bench" / "bench.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    finite = lambda v: isinstance(v, int | float) and math.isfinite(v) and v > 0  # noqa: E731
    assert finite(r["ceiling"]["forward_img_s"]) and finite(r["ceiling"]["grad_img_s"])
    for path in ("clean", "fgsm", "pgd10", "fgsm, reused direction+clean", "pgd10, early stop"):
        assert finite(r["engine"][path]["ratio"]) and finite(r["engine"][path]["img_s"]), path
    assert r["engine"]["fgsm, reused direction+clean"]["n_grad"] == 0  # the reuse really happened
    s = r["sweep"]
    assert s["ours"]["n_cells"] == s["plain"]["n_cells"] == 4 and finite(s["speedup"])
    assert finite(s["ours"]["peak_rss_mb"]) and finite(s["plain"]["wall_s"])
    assert math.isfinite(r["overhead"]["per_job_s"]) and len(r["overhead"]["wall_s"]) == 2
    for k in ("n_eval", "cells"):
        g = r["growth"][k]
        assert len(g["x"]) == len(g["wall_s"]) >= 2 and math.isfinite(g["slope"])
    assert "| ours: pgd10 |" in p.stdout and "speedup" in p.stdout  # the printed table
