"""Hydra's basic sweeper, plus what robustsweep needs around a grid of jobs.

1. *Validate everything first.* Hydra composes each job's config only when the job starts, so with
   the basic sweeper a typo in the fifth value of a sweep (``sparsity=0,0.5,1.5``) surfaces after
   four jobs have trained and logged. Here every job is composed and checked by
   ``robustsweep.config.validate`` before the first one starts; nothing touches the store otherwise.
2. *Resume.* Cells whose FINISHED run is already in the MLflow store are skipped (and counted).
3. *One parent run per sweep*, created (or reopened, for a relaunch) after validation; its id
   reaches the jobs through an environment variable.
4. *Failures are recorded, not fatal.* A failing job does not stop the others; the failures are
   written to ``<sweep dir>/sweep_status.json`` for the end-of-sweep callback, which reports them and
   makes the command exit non-zero.

Heavy imports stay inside the methods: Hydra imports every ``hydra_plugins`` module at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class InvalidSweepError(CompactHydraException):
    """Printed by Hydra as its message alone, without a traceback."""


class _ComposedOnce:
    """Hydra's config loader, except that a job whose config the sweeper already composed (to
    validate it) gets that config instead of a second composition (~0.2 s per job, measured).
    Each composed config is handed out once; anything else goes to the real loader."""

    def __init__(self, loader: Any, composed: dict[tuple[str, ...], DictConfig]) -> None:
        self._loader, self._composed = loader, composed

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        cfg = self._composed.pop(tuple(sweep_overrides), None)
        return cfg if cfg is not None else self._loader.load_sweep_config(master_config, sweep_overrides)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pickling (joblib launcher) must not recurse into the proxy
            raise AttributeError(name)
        return getattr(self._loader, name)


class ValidatingSweeper(BasicSweeper):
    def _compose_and_validate(self, batch: Sequence[Sequence[str]]) -> list[DictConfig]:
        from robustsweep.config import compose_and_validate

        assert self.hydra_context is not None and self.config is not None
        cfgs, errors = compose_and_validate(self.hydra_context.config_loader, self.config, batch)
        if errors:
            raise InvalidSweepError(
                f"{len(errors)} of {len(batch)} sweep jobs have invalid values; nothing was run:\n"
                + "\n".join(f"  {e}" for e in errors))
        return cfgs

    def sweep(self, arguments: list[str]) -> Any:
        from concurrent.futures.process import BrokenProcessPool  # loky's TerminatedWorkerError is one

        from robustsweep.core import process
        from robustsweep.core.device import PARALLEL_ENV, parallel_jobs
        from robustsweep.core.paths import redact_url
        from robustsweep.core.progress import heartbeat, relay
        from robustsweep.tracking import store
        from robustsweep.tracking import sweep as sw
        from robustsweep.tracking.cellrun import LAUNCHER_ENV

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        jobs = [job for batch in self.split_arguments(overrides, None) for job in batch]
        if not jobs:
            raise InvalidSweepError("the sweep has no jobs")
        # the first line a user sees: checking imports torch and every step (~5-10 s on a CPU)
        log.info("checking the %d cell%s of the sweep before anything runs", len(jobs),
                 "" if len(jobs) == 1 else "s")
        with heartbeat("checking the sweep's cells"):
            cfgs = self._compose_and_validate(jobs)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # redacted: a password in tracking.uri or search.storage must not land in a file
        (sweep_dir / "multirun.yaml").write_text(redact_url(OmegaConf.to_yaml(self.config)))

        experiment_id = store.setup(cfgs[0])
        client = store.Client()
        resume = bool(cfgs[0].tracking.get("resume", True))
        # cell index -> FINISHED run (under its current id or an earlier identity scheme's)
        done = {i: r for i, c in enumerate(cfgs) if resume and (r := sw.finished_run(client, experiment_id, c))}
        todo = [job for i, job in enumerate(jobs) if i not in done]
        skipped = len(jobs) - len(todo)
        log.info("sweep of %d cell%s: %d already FINISHED in the store (skipped), %d to run",
                 len(jobs), "" if len(jobs) == 1 else "s", skipped, len(todo))

        task = list(self.config.hydra.overrides.task)
        sid = sw.sweep_id(task, cfgs[0].tracking.experiment)
        shown = redact_url(" ".join(task))  # search.storage=postgresql://user:pw@... on the command line
        parent = sw.get_or_create_parent(
            client, experiment_id, sid, name=f"sweep {shown}"[:250],
            tags={"hydra.sweep.dir": str(sweep_dir), "hydra.overrides": shown,
                  "robustsweep.n_cells": str(len(jobs)), "robustsweep.skipped": str(skipped)})
        os.environ[sw.PARENT_ENV] = parent
        # worker processes (joblib, submitit_local) watch this process and stop when it is gone
        os.environ[LAUNCHER_ENV] = process.identity()
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        in_process = isinstance(self.launcher, BasicLauncher)
        estimate_s = (self._estimate([c for i, c in enumerate(cfgs) if i not in done], in_process)
                      if todo else None)
        t_start = time.monotonic()  # what the estimate is compared with: the cells, not the checks
        if in_process:  # in-process: reuse the composed configs
            from hydra.types import HydraContext

            ctx = self.launcher.hydra_context
            composed = {tuple(j): c for j, c in zip(jobs, cfgs, strict=True)}
            self.launcher.hydra_context = HydraContext(config_loader=_ComposedOnce(ctx.config_loader, composed),
                                                       callbacks=ctx.callbacks)
        elif todo:  # worker processes: their lines go to their own log files, not to this terminal
            at_once = parallel_jobs(self.config.hydra.launcher, len(todo))
            log.info("%d cell%s on %s, %d at a time; each job logs to %s/<job number>/%s.log", len(todo),
                     "" if len(todo) == 1 else "s", type(self.launcher).__name__, at_once, sweep_dir,
                     self.config.hydra.job.name)

        returns, failures = [], []
        step = self.max_batch_size or len(todo) or 1
        # Submitit's workers (local or SLURM) log to their job folders, not here: relay each finished
        # cell (and each error) to this terminal as it happens, instead of silence until the last one
        # ends. (Joblib's loky workers inherit this terminal and print their own lines; in-process
        # jobs print here anyway.)
        launcher = type(self.launcher).__name__
        quiet_workers = not isinstance(self.launcher, BasicLauncher) and "Joblib" not in launcher
        watch = (relay(sweep_dir, f"*/{self.config.hydra.job.name}.log", (" FINISHED in ", "[ERROR]"),
                       prefix="job ") if quiet_workers else nullcontext())
        try:
            with watch:
                for start in range(0, len(todo), step):
                    batch = todo[start:start + step]
                    # worker processes take their share of the cores (robustsweep.core.device.share_cpu_threads)
                    os.environ[PARALLEL_ENV] = str(parallel_jobs(self.config.hydra.launcher, len(batch)))
                    results = self.launcher.launch(batch, initial_job_idx=start)
                    for job, r in zip(batch, results, strict=True):
                        if r.status == JobStatus.FAILED:
                            err = r._return_value  # the exception; .return_value would re-raise it
                            failures.append({"overrides": [redact_url(o) for o in job],
                                             "error": redact_url(f"{type(err).__name__}: {err}")})
                    returns.append(results)
        except (KeyboardInterrupt, SystemExit) as e:
            self._interrupted(e, client, experiment_id, parent, sweep_dir, jobs, cfgs, done, failures)
        except BrokenProcessPool as e:  # joblib lost a worker (SIGKILL, OOM) and stopped the others with it
            self._interrupted(e, client, experiment_id, parent, sweep_dir, jobs, cfgs, done, failures)
        except Exception as e:  # any other launcher error: its jobs may still run (submitit), so their
            # runs are left as they are; the parent says what happened
            client.set_tag(parent, sw.ERROR_TAG, redact_url(f"launcher failed: {type(e).__name__}: {e}")[:4000])
            client.set_terminated(parent, "FAILED")
            raise
        (sweep_dir / "sweep_status.json").write_text(json.dumps(
            {"parent_run_id": parent, "n_cells": len(jobs), "skipped": skipped, "ran": len(todo),
             "failures": failures, "wall_s": time.monotonic() - t_start, "estimate_s": estimate_s}, indent=2))
        return returns

    def _estimate(self, cfgs: list[DictConfig], in_process: bool) -> list[float] | None:
        """Log how long the cells will take here (robustsweep.estimate): [least, most] seconds, or
        None when ``perf.estimate`` is off or the estimate failed (it never stops the sweep)."""
        from robustsweep.core.device import parallel_jobs
        from robustsweep.estimate import estimate

        if not cfgs[0].perf.get("estimate", True):
            return None
        assert self.config is not None
        launcher = self.config.hydra.launcher
        at_once = 1 if in_process else parallel_jobs(launcher, len(cfgs))
        # joblib's workers live for the whole sweep; submitit (local or SLURM) starts a process per job
        starts = 0 if in_process else (at_once if "Joblib" in str(launcher.get("_target_", "")) else len(cfgs))
        try:
            est = estimate(cfgs, at_once, starts)
        except Exception as e:  # an estimate must never cost the sweep
            log.warning("no estimate of the sweep's time (%s: %s)", type(e).__name__, e)
            return None
        for line in est.lines():
            log.info("%s", line)
        return list(est.total)

    @staticmethod
    def _interrupted(e: BaseException, client: Any, experiment_id: str, parent: str, sweep_dir: Path,
                     jobs: list[Sequence[str]], cfgs: list[DictConfig], done: dict[int, str],
                     failures: list[dict[str, Any]]) -> None:
        """Ctrl-C, an exit that escaped a job, or a joblib pool that lost a worker (SIGKILL, OOM):
        report what is kept, close the parent, exit 130 (interrupt) or 1.

        Finished cells are already FINISHED runs; a cell that was running in this process is closed
        FAILED by its own run context; cells whose worker process died (and the pool's other workers,
        which joblib terminates and waits for before raising) are marked FAILED here. A relaunch of
        the same command runs exactly what is missing."""
        from robustsweep.core.paths import redact_url
        from robustsweep.tracking import sweep as sw

        interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
        why = type(e).__name__ + (f": {str(e).splitlines()[0]}"[:300] if str(e).strip() else "")
        if not interrupted:
            n = sw.fail_running_children(client, experiment_id, parent, f"worker process lost ({why}); re-run")
            log.error("the launcher failed (%s); %d cell run(s) left RUNNING by its workers marked FAILED",
                      why, n)
        now = {i for i, c in enumerate(cfgs) if sw.finished_run(client, experiment_id, c)}
        not_done = [redact_url(" ".join(j)) for i, j in enumerate(jobs) if i not in now]
        client.set_tag(parent, sw.ERROR_TAG, f"interrupted by {type(e).__name__}")
        client.set_terminated(parent, "KILLED")
        (sweep_dir / "sweep_status.json").write_text(json.dumps(
            {"parent_run_id": parent, "n_cells": len(jobs), "skipped": len(done),
             "ran": len(now) - len(done), "failures": failures, "interrupted": type(e).__name__, "error": why,
             "not_finished": not_done}, indent=2))
        os.environ.pop(sw.PARENT_ENV, None)
        msg = (f"sweep {'interrupted' if interrupted else 'stopped'} ({why}): {len(now)} of {len(jobs)} cells "
               f"are FINISHED in the store ({len(now) - len(done)} this launch), {len(not_done)} not finished "
               f"(those that were running are marked FAILED). Relaunch the same command to run only those:\n"
               + "\n".join(f"  [{j}]" for j in not_done))
        log.error("%s", msg)
        raise SystemExit(130 if interrupted else 1) from e
