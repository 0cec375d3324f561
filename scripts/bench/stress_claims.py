"""Several sweeps on one store at once: is every cell computed exactly once, and is every run's data
its own? (README "What we check on every run", faults; issue 27.)

    python scripts/bench/stress_claims.py [--server] [--n 2 4] [--reps 5] [--out stress_claims.json]

For each N and repetition: N sweeps of the digits quickstart whose grids overlap (sweep k asks for
sparsities k, k+1, k+2 of a ladder, so neighbours share two cells and every cell is wanted by 1-3
sweeps) are started at the same instant into one fresh store: a SQLite file, or with ``--server`` a
fresh experiment on a tracking server on PostgreSQL started here (robustsweep.tracking.server). The
baseline is trained once beforehand so that the sweeps race on cells, not on training.

Checked after each repetition, printed as a table:
* every command exited 0;
* every cell of the union has exactly one FINISHED run, and no run is FAILED (no live run was marked
  dead; nothing was computed twice);
* every FINISHED run's ``config.yaml`` artifact has that run's sparsity, and its ``outcomes.csv``
  counts that run's ``n_correct`` (its artifacts are its own);
* no claim is left in the model registry.
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

import yaml

log = logging.getLogger("stress_claims")
LADDER = ["0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6"]
BASE = ["experiment=quickstart", "attribution=none", "data.n_eval=60", "train.epochs=3"]


def _launch_together(cwd: Path, n: int, experiment: str, env: dict[str, str],
                     store: list[str]) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "robustsweep", "-m", *BASE, *store,
                               f"sparsity={','.join(LADDER[k:k + 3])}", f"tracking.experiment={experiment}"],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(n)]
    codes = []
    for p in procs:
        out = p.communicate()[0]
        codes.append(p.returncode)
        if p.returncode:
            log.error("a sweep failed:\n%s", out[-3000:])
    return codes, time.perf_counter() - t0


def _check(uri: str, experiment: str, wanted: set[str]) -> dict[str, int]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("robustsweep.role") == "cell"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    per_cell: dict[float, int] = {}
    for r in finished:
        s = float(r.data.params["sparsity"])
        per_cell[s] = per_cell.get(s, 0) + 1
    own = 0
    for r in finished:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, tracking_uri=uri))
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        lines = (folder / "outcomes.csv").read_text().splitlines()
        head = lines[0].split(",")
        correct = sum(row.split(",")[head.index("label")] == row.split(",")[head.index("clean_pred")]
                      for row in lines[1:])
        own += cfg["sparsity"] == float(r.data.params["sparsity"]) and correct == r.data.metrics["n_correct"]
        shutil.rmtree(folder, ignore_errors=True)
    return {"cells": len(wanted), "cells_with_one_finished": sum(per_cell.get(float(c)) == 1 for c in wanted),
            "finished_runs": len(finished), "failed_runs": sum(r.info.status == "FAILED" for r in runs),
            "running_runs": sum(r.info.status == "RUNNING" for r in runs), "artifacts_own": own,
            "claims_left": len(client.search_registered_models(max_results=1000))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="store_true", help="a tracking server on PostgreSQL instead of SQLite")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4], help="sweeps launched together")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("stress_claims.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="rs-stress-", dir="/tmp"))
    work.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-m", "robustsweep", *BASE, "sparsity=0", "tracking.experiment=warmup"],
                   cwd=work, env=env, check=True, capture_output=True)  # the baseline, cached in work/outputs
    if args.server:
        from robustsweep.tracking import server

        env["MLFLOW_TRACKING_URI"] = server.start(work / "server", port=5078, pg_port=5478).tracking_uri
    rows = []
    try:
        for n in args.n:
            for rep in range(args.reps):
                experiment = f"stress-n{n}-r{rep}"
                # a fresh SQLite file per repetition (a new name: this process's MLflow keeps the old
                # file open); on the server a fresh experiment
                uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work}/outputs/{experiment}.db"
                store = [] if args.server else [f"tracking.uri={uri}"]
                codes, seconds = _launch_together(work, n, experiment, env, store)
                row = {"n": n, "rep": rep, "seconds": round(seconds, 1), "exit_codes": codes,
                       **_check(uri, experiment, {c for k in range(n) for c in LADDER[k:k + 3]})}
                row["ok"] = (not any(codes) and row["cells_with_one_finished"] == row["cells"]
                             == row["finished_runs"] == row["artifacts_own"] and not row["failed_runs"]
                             and not row["running_runs"] and not row["claims_left"])
                rows.append(row)
                log.info("%s", row)
    finally:
        if args.server:
            server.stop(work / "server")
        shutil.rmtree(work, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "machine": platform.machine(),
            "store": "tracking server (PostgreSQL)" if args.server else "SQLite"}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    log.info("store: %s\n| N | rep | s | cells | exactly one FINISHED | FAILED | artifacts own | claims left |"
             " ok |\n|---|---|---|---|---|---|---|---|---|\n%s", meta["store"], "\n".join(
                 f"| {r['n']} | {r['rep']} | {r['seconds']} | {r['cells']} | {r['cells_with_one_finished']} | "
                 f"{r['failed_runs']} | {r['artifacts_own']} | {r['claims_left']} | {r['ok']} |" for r in rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
