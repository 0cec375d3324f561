"""Hydra callbacks: a preflight before anything starts, and the end-of-sweep summary.

``Preflight``: before Hydra creates its first output folder, check that ``paths.output_dir`` and
the MLflow store's folder are writable and have room (``tracking.preflight``); otherwise exit with
the message alone, not a traceback from deep inside a job.

``SweepSummaryCallback``: at the end of a multirun, summarise the sweep onto its MLflow parent run.

The validating sweeper created the parent run and wrote ``<sweep dir>/sweep_status.json``. Here the
summary figures and ``cells.csv`` (robustsweep.summary) are logged to the parent under
``summary/``, cells whose ASR falls as eps grows are tagged ``suspect`` (robustsweep.tracking.crosscheck), the
parent is closed (FAILED if any cell failed), and failed cells are listed; the command then exits
non-zero.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def check_launcher(config: DictConfig) -> None:
    """Launcher settings that would otherwise fail only after submission (or never say why)."""
    from robustsweep.core.errors import ConfigError
    from robustsweep.tracking.store import resolve_tracking_uri, sqlite_path

    launcher = config.hydra.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n_jobs, cpus = launcher.get("n_jobs"), os.cpu_count() or 1
        if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0 or cpus + 1 + n_jobs < 1:
            raise ConfigError(f"hydra.launcher.n_jobs={n_jobs!r} is not valid; allowed: a number of worker "
                              f"processes >= 1, or -1 for one per CPU ({cpus} here), -2 for all but one, ...")
    if target.endswith("SlurmLauncher"):
        if not launcher.get("partition"):
            raise ConfigError(f"hydra.launcher.partition={launcher.get('partition')!r} is not valid; allowed: "
                              f"the SLURM partition to submit to, e.g. hydra.launcher.partition=gpu")
        if sqlite_path(resolve_tracking_uri(config.tracking.uri)) is not None:
            log.warning("hydra/launcher=submitit_slurm with a SQLite store: jobs on other nodes would share "
                        "one file over the network file system, where SQLite's locks are unreliable. Start a "
                        "tracking server (python -m robustsweep.tracking.server start) and export its "
                        "MLFLOW_TRACKING_URI (README \"Scaling out\")")


class Preflight(Callback):
    def _check(self, config: DictConfig) -> None:
        from robustsweep.core.errors import ConfigError
        from robustsweep.tracking.store import preflight

        try:
            check_launcher(config)
            preflight(config)
        except ConfigError as e:
            # Hydra turns exceptions from callbacks into warnings; SystemExit gets through.
            raise SystemExit(f"configuration error, nothing was run: {e}") from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


class SweepSummaryCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from robustsweep.tracking import sweep as sw

        report = Path(config.hydra.sweep.dir) / "sweep_status.json"
        parent = os.environ.get(sw.PARENT_ENV)
        if not report.is_file() or not parent:
            return  # not swept by the validating sweeper (e.g. another sweeper): nothing to do
        info = json.loads(report.read_text())
        client = None
        try:
            client, problems = self._summarise(config, parent)
        except KeyboardInterrupt:  # Ctrl-C while the summary is written: the parent is KILLED, not RUNNING
            _close(client, config, parent, "KILLED", "interrupted during the sweep summary")
            log.error("sweep interrupted while its summary was written: the cells are in the store; parent run "
                      "%s marked KILLED (python -m robustsweep.report --parent-run-id %s writes the summary "
                      "again)", parent, parent)
            raise SystemExit(130) from None
        failures = info["failures"]
        status = "FAILED" if failures or problems else "FINISHED"
        _close(client, config, parent, status, "; ".join(problems))
        n = info["n_cells"]
        log.info("sweep done: %d cell%s, %d skipped (already FINISHED), %d ran, %d failed",
                 n, "" if n == 1 else "s", info["skipped"], info["ran"], len(failures))
        if info.get("wall_s") is not None and info.get("estimate_s"):
            from robustsweep.core.cost import duration, span

            log.info("the cells took %s (estimated before the sweep: %s)", duration(info["wall_s"]),
                     span(*info["estimate_s"]))
        if failures or problems:
            lines = "\n".join([*(f"  [{' '.join(f['overrides'])}]: {f['error']}" for f in failures),
                               *(f"  {p}" for p in problems)])
            # Hydra turns exceptions from callbacks into warnings; SystemExit gets through, so
            # the command exits 1 with this message on stderr.
            raise SystemExit(f"{len(failures)} of {info['ran']} cells failed"
                             + (f" and {len(problems)} problem(s) at the end of the sweep" if problems else "")
                             + f" (parent run {parent} marked FAILED):\n{lines}")

    @staticmethod
    def _summarise(config: DictConfig, parent: str) -> tuple[Any, list[str]]:
        """Cross-sweep checks and the summary figures on the parent; what went wrong, as lines (a disk
        that fills or turns read-only at the end of a sweep fails the sweep, not only a warning)."""
        from robustsweep.core.paths import redact_url
        from robustsweep.summary import SummaryError, write_summary
        from robustsweep.tracking import crosscheck, store

        problems: list[str] = []
        try:
            store.setup(config)
            client = store.Client()
        except Exception as e:
            why = redact_url(f"{type(e).__name__}: {e}")
            return None, [f"the store cannot be reached to close the sweep: {why}"]
        try:
            flagged = crosscheck.check_sweep(client, parent, float(config.checks.tol))
            client.log_metric(parent, "n_suspect_eps", len(flagged))
            # Staged in the sweep's own folder (it stays there, beside the jobs' folders), then logged.
            out = Path(config.hydra.sweep.dir) / "summary"
            cells = write_summary(client, parent, out)
            client.log_artifacts(parent, str(out), "summary")
            log.info("sweep summary of %d cell%s logged to parent run %s", len(cells),
                     "" if len(cells) == 1 else "s", parent)
        except SummaryError as e:
            log.warning("no summary: %s", e)
        except Exception as e:  # a full or read-only disk, the store gone: said, and the sweep FAILED
            why = redact_url(f"{type(e).__name__}: {e}")
            problems.append(f"the sweep summary could not be written: {why}")
            log.error("%s", problems[-1])
        return client, problems


def _close(client: Any, config: DictConfig, parent: str, status: str, why: str) -> None:
    """Close the sweep's parent run with ``status`` (and ``why`` as its error tag); never raises."""
    import contextlib

    from robustsweep.tracking import store
    from robustsweep.tracking import sweep as sw

    os.environ.pop(sw.PARENT_ENV, None)
    try:
        if client is None:
            store.setup(config)
            client = store.Client()
        if why:
            client.set_tag(parent, sw.ERROR_TAG, why[:4000])
        client.set_terminated(parent, status)
    except Exception as e:
        with contextlib.suppress(Exception):
            log.error("could not mark parent run %s %s: %s", parent, status, e)
