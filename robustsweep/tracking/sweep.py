"""Sweeps in MLflow: one parent run per sweep, one child run per cell, resumable by cell identity.

* ``cell_id`` = SHA-256 of the canonical config that determines a cell's results
  (robustsweep.tracking.identity). Same cell, same id, in any sweep.
* A sweep is identified by its override list (``sweep_id``); relaunching the same command reuses
  the same parent run, so a resumed sweep still shows as one parent with all its children.
* Resume: cells that already have a FINISHED run with their ``cell_id`` are skipped (the
  validating sweeper drops them before launching). A job claims its cell before computing it
  (robustsweep.tracking.claims), so two launchers never compute one cell; runs left RUNNING by a
  process whose claim lapsed are marked FAILED by the next holder, never a live one.

The parent run id reaches the jobs through ``ROBUSTSWEEP_PARENT_RUN_ID`` (set by the callback
before any job starts, so launcher subprocesses inherit it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig

from robustsweep.tracking.identity import lookup_ids

log = logging.getLogger(__name__)

PARENT_ENV = "ROBUSTSWEEP_PARENT_RUN_ID"
CELL_TAG = "robustsweep.cell_id"
SWEEP_TAG = "robustsweep.sweep_id"
ROLE_TAG = "robustsweep.role"
ERROR_TAG = "robustsweep.error"
SUSPECT_TAG = "suspect"  # comma-separated reasons (README "What we check on every run")
TRIAL_ENV = "ROBUSTSWEEP_OPTUNA_TRIAL"  # set per job by the Optuna sweeper (hydra.job.env_set)
STUDY_ENV = "ROBUSTSWEEP_OPTUNA_STUDY"

def sweep_id(task_overrides: Iterable[str], experiment: str) -> str:
    """Identity of a sweep command: its overrides (order-free) minus tracking.resume/hydra.*."""
    keep = sorted(o for o in task_overrides
                  if not o.lstrip("+~").startswith(("hydra.", "tracking.resume")))
    blob = json.dumps({"overrides": keep, "experiment": experiment})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished_run(client: Any, experiment_id: str, cfg: DictConfig) -> str | None:
    """The run_id of a FINISHED run of the cell ``cfg`` describes (under its current id or the id
    an earlier identity scheme gave it: robustsweep.tracking.identity), else None."""
    for cid in lookup_ids(cfg):
        runs = client.search_runs([experiment_id], f"tags.`{CELL_TAG}` = '{cid}' "
                                  f"AND attributes.status = 'FINISHED'", max_results=1)
        if runs:
            return runs[0].info.run_id
    return None


def fail_stale_runs(client: Any, experiment_id: str, cid: str) -> int:
    """Mark RUNNING runs of a cell FAILED (left by a killed process); return how many. Call it only
    while holding the cell's claim: then every RUNNING run of the cell belongs to a dead holder."""
    stale = client.search_runs([experiment_id], f"tags.`{CELL_TAG}` = '{cid}' "
                               f"AND attributes.status = 'RUNNING'", max_results=1000)
    for r in stale:
        client.set_tag(r.info.run_id, ERROR_TAG, "left RUNNING by an interrupted process; re-run")
        client.set_terminated(r.info.run_id, "FAILED")
    if stale:
        log.warning("cell %s: marked %d stale RUNNING run(s) FAILED", cid, len(stale))
    return len(stale)


def fail_running_children(client: Any, experiment_id: str, parent_run_id: str, reason: str) -> int:
    """Mark the RUNNING child runs of a sweep FAILED with ``reason`` (their worker processes are gone:
    a launcher that lost a worker takes the others down with it); return how many."""
    running = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                 f"AND attributes.status = 'RUNNING'", max_results=10000)
    for r in running:
        client.set_tag(r.info.run_id, ERROR_TAG, reason[:4000])
        client.set_terminated(r.info.run_id, "FAILED")
    return len(running)


def newest_cell_runs(client: Any, experiment: str) -> list[Any] | None:
    """Every FINISHED cell run of an experiment (any sweep, study or single job), the newest per
    cell id; None when there is no such experiment. What the README's tables are built from."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    seen: set[str] = set()
    out = []
    for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=10000,
                                order_by=["attributes.start_time DESC"]):
        cid = r.data.tags.get(CELL_TAG)
        if cid and cid not in seen:
            seen.add(cid)
            out.append(r)
    return out


def finished_children(client: Any, parent_run_id: str, experiment_id: str | None = None) -> list[Any]:
    """The FINISHED child runs of a parent run (a sweep's cells, a study's trials)."""
    exp = experiment_id or client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                              f"AND attributes.status = 'FINISHED'", max_results=10000)


def parent_run_id() -> str | None:
    return os.environ.get(PARENT_ENV) or None


def get_or_create_parent(client: Any, experiment_id: str, sid: str, name: str,
                         tags: dict[str, str], role: str = "sweep") -> str:
    """The sweep's (or Optuna study's, role="study") parent run: reopened if it ran before,
    else created."""
    prev = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sid}' AND "
                              f"tags.`{ROLE_TAG}` = '{role}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if prev:
        run_id = prev[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        log.info("resuming sweep %s in parent run %s", sid, run_id)
        return run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={SWEEP_TAG: sid, ROLE_TAG: role, **tags})
    log.info("sweep %s: parent run %s", sid, run.info.run_id)
    return run.info.run_id
