"""One cell, one MLflow run: open it (resume, sweep parent, Optuna trial plumbing), log it, close it.

The run opens before any data is read, so anything that fails later (data, training, attack)
leaves a FAILED run with the error as the tag ``robustsweep.error``. In a multirun the run is a
child of the sweep's parent run. A cell whose FINISHED run is already in the store is not
computed again (``tracking.resume=false`` forces it): ``Cell.stored`` holds its metrics. A trial of
an Optuna study whose cell another sweep computed becomes a FINISHED child of the study's parent
with a pointer to the original, so every trial is a child run without computing anything twice.

Several launchers, one store: the cell is claimed first (robustsweep.tracking.claims) and a job whose
cell another live process holds waits for it; every run stages its artifacts in a folder named by its
run id; a job in a worker process (joblib, submitit_local) watches its launcher and stops when the
launcher is gone (its run FAILED, its claim released), instead of computing on unseen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustsweep.core import process
from robustsweep.core.paths import redact_url
from robustsweep.tracking import claims, store
from robustsweep.tracking import sweep as sw
from robustsweep.tracking.identity import cell_id

log = logging.getLogger(__name__)


@dataclass
class Cell:
    stored: dict[str, float] | None = None  # metrics of an earlier FINISHED run: nothing to compute
    stage: Path = Path()  # files written here are uploaded as the run's artifacts
    run_id: str = ""
    client: Any = None
    mlflow_s: float = 0.0  # seconds spent talking to the store
    metrics: dict[str, float] = field(default_factory=dict)

    def log(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """One batched call for metrics + tags, one for the artifact folder; ``mlflow_s`` last."""
        import mlflow
        from mlflow.entities import RunTag

        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        shown, exact = store.metric_batch(metrics, now)  # the UI's 4 digits; exact values in a tag
        self.client.log_batch(self.run_id, metrics=shown,
                              tags=[*(RunTag(k, v) for k, v in tags.items()), *exact])
        mlflow.log_artifacts(str(self.stage))
        self.mlflow_s += time.perf_counter() - t0
        self.client.log_metric(self.run_id, "mlflow_s", store.shown(self.mlflow_s), now)
        self.metrics = {**metrics, "mlflow_s": self.mlflow_s}


@contextlib.contextmanager
def _artifact_dir(run_id: str) -> Iterator[Path]:
    """Where a job writes files before logging them: ``mlflow/<run id>/`` in the Hydra job dir (its own
    folder even when two launches share a job dir), else a temp dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        stage = Path(HydraConfig.get().runtime.output_dir) / "mlflow" / run_id
        stage.mkdir(parents=True, exist_ok=False)  # a run id is unique: an existing folder is a bug
        yield stage
    else:
        with tempfile.TemporaryDirectory(prefix=f"robustsweep-{run_id}-") as d:
            yield Path(d)


@contextlib.contextmanager
def open_cell(cfg: DictConfig) -> Iterator[Cell]:
    """The cell's MLflow run, open for the duration (FAILED with the error tag if the body raises).

    Claimed first (robustsweep.tracking.claims): while another live process computes the same cell,
    this one waits and then returns its stored metrics instead of computing it again."""
    import mlflow

    store.preflight(cfg)  # writable, with room: a clear error now, not a traceback later
    _exit_if_orphaned()
    experiment_id = store.setup(cfg)
    client = store.Client()
    cid = cell_id(cfg)
    tags = {sw.CELL_TAG: cid, sw.ROLE_TAG: "cell", **store.hydra_tags(), **store.environment_tags()}
    parent = sw.parent_run_id()
    if parent and "hydra.sweep.dir" in tags:  # a single run has no parent
        tags["mlflow.parentRunId"] = parent
        if os.environ.get(sw.TRIAL_ENV):  # a trial of an Optuna study
            tags["optuna.trial_number"] = os.environ[sw.TRIAL_ENV]
            tags["optuna.study_name"] = os.environ.get(sw.STUDY_ENV, "")
    resume = bool(cfg.tracking.get("resume", True))
    if resume and (done := sw.finished_run(client, experiment_id, cfg)):
        yield _stored(client, experiment_id, done, tags, parent, cfg)
        return
    claim = claims.Claim(client, experiment_id, cid, float(cfg.tracking.get("lease_s", 60)))
    try:
        done = _acquire(claim, client, experiment_id, cfg, resume)
        if done:  # finished by the process we waited for
            yield _stored(client, experiment_id, done, tags, parent, cfg)
            return
        # We hold the claim, so a RUNNING run of this cell belongs to a holder that is gone.
        sw.fail_stale_runs(client, experiment_id, cid)
        t0 = time.perf_counter()
        active = store.retry_locked(mlflow.start_run, experiment_id=experiment_id,
                                    run_name=store.run_name(cfg), tags=tags)
        run_id = active.info.run_id
        claim.set_run(run_id)
        # Params first, so that a cell which fails later still shows what it was.
        client.log_batch(run_id, params=store.param_entities(cfg))
        cell = Cell(run_id=run_id, client=client, mlflow_s=time.perf_counter() - t0)
        with _artifact_dir(run_id) as stage, active, _orphan_watch(client, run_id, claim) as closing:
            cell.stage = stage
            (cell.stage / "config.yaml").write_text(redact_url(OmegaConf.to_yaml(cfg, resolve=True)))
            try:
                yield cell
                with closing:  # the orphan watch may not fail the run between this check and FINISHED
                    if not claim.held():
                        raise claims.ClaimLostError(
                            f"cell {cid}: another process took over its claim while this one computed it "
                            f"(stopped for longer than tracking.lease_s={claim.lease_s:g}); not recorded")
                    store.retry_locked(mlflow.end_run, "FINISHED")
                # the line a person looks for at the end of a run (and, per cell, in a worker's log)
                log.info("cell %s: run %s FINISHED in %s (experiment %r)", store.run_name(cfg), run_id,
                         redact_url(mlflow.get_tracking_uri()), cfg.tracking.experiment)
            except BaseException as e:
                client.set_tag(cell.run_id, sw.ERROR_TAG, redact_url(f"{type(e).__name__}: {e}")[:4000])
                raise
    finally:
        claim.release()


def _stored(client: Any, experiment_id: str, run_id: str, tags: dict[str, str], parent: str | None,
            cfg: DictConfig) -> Cell:
    """A cell FINISHED by an earlier or a concurrent run: its stored metrics (and, for a study trial, a
    FINISHED child of the study pointing at it)."""
    log.info("cell %s already FINISHED in run %s: skipped (tracking.resume=false re-runs it)",
             tags[sw.CELL_TAG], run_id)
    prev = client.get_run(run_id)
    if "optuna.trial_number" in tags and prev.data.tags.get("mlflow.parentRunId") != parent:
        _reuse_as_child(client, experiment_id, prev, tags, cfg)
    return Cell(stored=store.exact_metrics(prev))


def _acquire(claim: claims.Claim, client: Any, experiment_id: str, cfg: DictConfig, resume: bool) -> str | None:
    """Hold ``claim``, waiting while a live process holds it. Returns the run id of a FINISHED run of
    the cell when one appears meanwhile (nothing to compute), else None (we hold the claim)."""
    poll_s = min(2.0, claim.lease_s / 10)
    said = 0.0
    while not claim.try_acquire():
        if resume and (done := sw.finished_run(client, experiment_id, cfg)):
            return done
        _exit_if_orphaned()
        if time.monotonic() - said > 10:  # a line every ~10 s, never silent for longer
            log.info("cell %s is being computed by %s: waiting for it", claim.cell_id,
                     claim.holder.describe() if claim.holder else "another process")
            said = time.monotonic()
        time.sleep(poll_s)
    # Claimed; the holder we waited for may have finished it just before letting go.
    if resume and (done := sw.finished_run(client, experiment_id, cfg)):
        claim.release()
        return done
    return None


# The launching process (Hydra's sweeper) of this job, as robustsweep.core.process.identity(): set
# by the sweepers before they launch, inherited by joblib and submitit worker processes.
LAUNCHER_ENV = "ROBUSTSWEEP_LAUNCHER"


def _launcher() -> str | None:
    """The launcher's identity when this job runs in another process of this machine (a joblib or
    submitit_local worker), else None (in-process launcher, single run, or a launcher elsewhere)."""
    ident = os.environ.get(LAUNCHER_ENV)
    if not ident or ident == process.identity() or process.running(ident) is None:
        return None
    return ident


def launcher_gone() -> bool:
    """This job runs in a worker process whose launcher (on this machine) has died."""
    ident = os.environ.get(LAUNCHER_ENV)
    return bool(ident) and ident != process.identity() and process.running(ident) is False


def _exit_if_orphaned() -> None:
    if launcher_gone():
        log.error("the process that launched this job (%s) is gone: this worker stops without starting "
                  "the cell (relaunch the sweep to run it)", os.environ[LAUNCHER_ENV])
        logging.shutdown()
        os._exit(1)


class _Closing:
    """Held while a run is being closed FINISHED: the orphan watch then neither fails it nor ends the
    process; once closed, the watch stands down."""

    def __init__(self) -> None:
        self.lock, self.closed = threading.Lock(), threading.Event()

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.lock.release()


_BUSY_LOCK = threading.Lock()
_BUSY = {"cells": 0, "idle_watch": 0}  # cells computing in this process; idle watch started (0/1)


def _idle_watch(poll_s: float = 1.0) -> None:
    """In a worker process, between cells: an idle worker whose launcher was SIGKILLed waits for work
    that never comes (loky's and submitit's workers outlived their launcher on a busy machine). From
    this worker's first cell on, a daemon thread ends the process once the launcher is gone and no
    cell is computing (a computing cell's own watch fails its run first)."""
    with _BUSY_LOCK:
        if _BUSY["idle_watch"] or _launcher() is None:
            return
        _BUSY["idle_watch"] = 1

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if not launcher_gone():
                continue
            with _BUSY_LOCK:
                if _BUSY["cells"]:
                    continue
                log.error("the launcher (%s) is gone: this idle worker stops", os.environ[LAUNCHER_ENV])
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=watch, name="robustsweep-idle-watch", daemon=True).start()


@contextlib.contextmanager
def _orphan_watch(client: Any, run_id: str, claim: claims.Claim, poll_s: float = 1.0) -> Iterator[_Closing]:
    """In a worker process: once a second, is the launcher still there? When it is gone (SIGKILLed:
    joblib's and submitit's workers would compute on, unseen, and start the next cell), mark the run
    FAILED, release the claim and end this process, so a relaunch can run the cell at once."""
    closing = _Closing()
    if _launcher() is None:
        yield closing
        return
    _idle_watch(poll_s)

    def watch() -> None:
        while not closing.closed.wait(poll_s):
            if not launcher_gone():
                continue
            with closing.lock:
                if closing.closed.is_set():
                    return
                log.error("the launcher (%s) is gone: this orphaned worker marks its cell's run FAILED and "
                          "stops", os.environ[LAUNCHER_ENV])
                with contextlib.suppress(Exception):
                    client.set_tag(run_id, sw.ERROR_TAG, "launcher process gone (orphaned worker); re-run")
                    client.set_terminated(run_id, "FAILED")
                claim.release()
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=watch, name="robustsweep-orphan-watch", daemon=True).start()
    with _BUSY_LOCK:
        _BUSY["cells"] += 1
    try:
        yield closing
    finally:
        closing.closed.set()
        with _BUSY_LOCK:
            _BUSY["cells"] -= 1


def _reuse_as_child(client: Any, experiment_id: str, prev: Any, tags: dict[str, str],
                    cfg: DictConfig) -> None:
    """A study trial whose cell another sweep already computed: a FINISHED child run under the
    study's parent with the stored metrics and a pointer to the original."""
    run = client.create_run(experiment_id, run_name=store.run_name(cfg),
                            tags={**tags, "robustsweep.reused_from": prev.info.run_id})
    shown, exact = store.metric_batch(store.exact_metrics(prev), int(time.time() * 1000))
    client.log_batch(run.info.run_id, metrics=shown, params=store.param_entities(cfg), tags=exact)
    client.set_terminated(run.info.run_id, "FINISHED")
