"""One cell, one MLflow run: open it (resume, sweep parent, Optuna trial plumbing), log it, close it.

The run opens before any data is read, so anything that fails later (data, training, attack)
leaves a FAILED run with the error as the tag ``robustsweep.error``. In a multirun the run is a
child of the sweep's parent run. A cell whose FINISHED run is already in the store is not
computed again (``tracking.resume=false`` forces it): ``Cell.stored`` holds its metrics. A trial of
an Optuna study whose cell another sweep computed becomes a FINISHED child of the study's parent
with a pointer to the original, so every trial is a child run without computing anything twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustsweep.tracking import store
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
        from mlflow.entities import Metric, RunTag

        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        mlflow.log_artifacts(str(self.stage))
        self.mlflow_s += time.perf_counter() - t0
        self.client.log_metric(self.run_id, "mlflow_s", self.mlflow_s, now)
        self.metrics = {**metrics, "mlflow_s": self.mlflow_s}


@contextlib.contextmanager
def _artifact_dir() -> Iterator[Path]:
    """Where a job writes files before logging them: the Hydra job dir, else a temp dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        yield Path(HydraConfig.get().runtime.output_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="robustsweep-") as d:
            yield Path(d)


@contextlib.contextmanager
def open_cell(cfg: DictConfig) -> Iterator[Cell]:
    """The cell's MLflow run, open for the duration (FAILED with the error tag if the body raises)."""
    import mlflow

    store.preflight(cfg)  # writable, with room: a clear error now, not a traceback later
    experiment_id = store.setup(cfg)
    client = store.Client()
    cid = cell_id(cfg)
    tags = {sw.CELL_TAG: cid, sw.ROLE_TAG: "cell", **store.hydra_tags()}
    parent = sw.parent_run_id()
    if parent and "hydra.sweep.dir" in tags:  # a single run has no parent
        tags["mlflow.parentRunId"] = parent
        if os.environ.get(sw.TRIAL_ENV):  # a trial of an Optuna study
            tags["optuna.trial_number"] = os.environ[sw.TRIAL_ENV]
            tags["optuna.study_name"] = os.environ.get(sw.STUDY_ENV, "")
    if cfg.tracking.get("resume", True) and (done := sw.finished_run(client, experiment_id, cfg)):
        log.info("cell %s already FINISHED in run %s: skipped (tracking.resume=false re-runs it)", cid, done)
        prev = client.get_run(done)
        if "optuna.trial_number" in tags and prev.data.tags.get("mlflow.parentRunId") != parent:
            _reuse_as_child(client, experiment_id, prev, tags, cfg)
        yield Cell(stored=dict(prev.data.metrics))
        return
    sw.fail_stale_runs(client, experiment_id, cid)
    t0 = time.perf_counter()
    active = store.retry_locked(mlflow.start_run, experiment_id=experiment_id,
                                run_name=store.run_name(cfg), tags=tags)
    # Params first, so that a cell which fails later still shows what it was.
    client.log_batch(active.info.run_id, params=store.param_entities(cfg))
    cell = Cell(run_id=active.info.run_id, client=client, mlflow_s=time.perf_counter() - t0)
    with _artifact_dir() as job_dir, active:
        cell.stage = job_dir / "mlflow"
        cell.stage.mkdir(parents=True, exist_ok=True)
        (cell.stage / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        try:
            yield cell
        except BaseException as e:
            client.set_tag(cell.run_id, sw.ERROR_TAG, f"{type(e).__name__}: {e}"[:4000])
            raise


def _reuse_as_child(client: Any, experiment_id: str, prev: Any, tags: dict[str, str],
                    cfg: DictConfig) -> None:
    """A study trial whose cell another sweep already computed: a FINISHED child run under the
    study's parent with the stored metrics and a pointer to the original."""
    from mlflow.entities import Metric

    run = client.create_run(experiment_id, run_name=store.run_name(cfg),
                            tags={**tags, "robustsweep.reused_from": prev.info.run_id})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, v, now, 0) for k, v in prev.data.metrics.items()],
                     params=store.param_entities(cfg))
    client.set_terminated(run.info.run_id, "FINISHED")
