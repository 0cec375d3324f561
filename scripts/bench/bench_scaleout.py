"""Throughput of the launchers on this machine: cells per minute for the 16-cell quickstart grid.

    python scripts/bench/bench_scaleout.py [--server] [--out bench_scaleout.json]

Claim checked (README "Scaling out"): on a 2-core CPU, parallel worker processes buy little for
cells this small, and they lose the per-process reuse (robustsweep.tracking.reuse: the baseline,
the compressed model and the clean predictions are kept in memory between the cells of one process;
each worker process loads them again). Runs ``python -m robustsweep -m experiment=quickstart
sparsity=0,0.25,0.5,0.75 epsilon=0.05,0.1,0.2,0.3`` (16 cells) with: the in-process grid sweeper
(Hydra's basic launcher), joblib with 1, 2 and 4 workers, and submitit's local executor 2 jobs at a
time; each in a fresh folder whose baseline cache is warmed first (so no variant pays for training),
each into a fresh SQLite store, or with ``--server`` into a fresh experiment on a tracking server
started here (PostgreSQL + mlflow server, robustsweep.tracking.server). Wall time of the whole
command, so start-up counts: that is what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_scaleout")
GRID = ["-m", "experiment=quickstart", "sparsity=0,0.25,0.5,0.75", "epsilon=0.05,0.1,0.2,0.3"]
VARIANTS = {
    "grid sweeper, in-process": [],
    "joblib, 1 worker": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
    "joblib, 2 workers": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "joblib, 4 workers": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
    "submitit_local, 2 at a time": ["hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=2"],
}


def _robustsweep(cwd: Path, args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "robustsweep", *args], cwd=cwd, env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"robustsweep {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return time.perf_counter() - t0


def _finished_children(uri: str, experiment: str) -> list[int]:
    """FINISHED cell runs under each sweep parent of ``experiment``: [16] is a complete sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r.info.run_id for r in runs if r.data.tags.get("robustsweep.role") == "sweep"]
    return [sum(r.info.status == "FINISHED" and r.data.tags.get("mlflow.parentRunId") == p for r in runs)
            for p in parents]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="store_true", help="log into a tracking server on PostgreSQL")
    ap.add_argument("--out", type=Path, default=Path("bench_scaleout.json"))
    ap.add_argument("--only", default="", help="run only the launchers whose name contains this (the "
                                                "in-process grid always runs: it is the reference)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="rs-bench-", dir="/tmp"))
    work.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server_info = {}
    if args.server:
        from robustsweep.tracking import server

        state = server.start(work / "server", port=5077, pg_port=5477)
        env["MLFLOW_TRACKING_URI"] = state.tracking_uri
        server_info["start_s"] = state.started_s
    rows = []
    try:
        cache = work / "cache"
        local = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the warm-up's own store
        _robustsweep(work, ["experiment=quickstart", "sparsity=0", f"paths.output_dir={cache}",
                            f"tracking.uri=sqlite:///{cache}/mlflow.db"], local)
        for i, (name, extra) in enumerate(VARIANTS.items()):
            if i and args.only not in name:
                continue
            run_dir = work / f"v{i}"
            shutil.copytree(cache / "cache", run_dir / "outputs" / "cache")  # the warmed baseline
            tracking = [f"tracking.experiment=bench{i}"]
            seconds = _robustsweep(run_dir, [*GRID, *extra, *tracking], env)
            children = _finished_children(env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir}/outputs/mlflow.db",
                                          f"bench{i}")
            rows.append({"variant": name, "seconds": seconds, "cells_per_min": 16 * 60 / seconds,
                         "finished_children_per_parent": children})
            log.info("%-30s 16 cells in %6.1f s: %5.1f cells/min; FINISHED children per parent: %s", name,
                     seconds, 16 * 60 / seconds, children)
    finally:
        if args.server:
            server_info["stop_s"] = server.stop(work / "server")
            server_info["left_behind"] = server.leftovers(work)
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "machine": platform.machine(),
            "store": "tracking server (PostgreSQL)" if args.server else "SQLite", **server_info}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    log.info("store: %s\n| launcher | 16 cells (s) | cells/min | vs in-process |\n|---|---|---|---|\n%s",
             meta["store"], "\n".join(f"| {r['variant']} | {r['seconds']:.1f} | {r['cells_per_min']:.1f} | "
                                      f"{base / r['seconds']:.2f}x |" for r in rows))
    if server_info:
        log.info("server: started in %.1f s, stopped in %.1f s, left behind: %s", server_info["start_s"],
                 server_info["stop_s"], server_info["left_behind"] or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
