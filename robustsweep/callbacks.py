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
        from robustsweep.summary import SummaryError, write_summary
        from robustsweep.tracking import crosscheck, store
        from robustsweep.tracking import sweep as sw

        report = Path(config.hydra.sweep.dir) / "sweep_status.json"
        parent = os.environ.get(sw.PARENT_ENV)
        if not report.is_file() or not parent:
            return  # not swept by the validating sweeper (e.g. another sweeper): nothing to do
        info = json.loads(report.read_text())
        store.setup(config)
        client = store.Client()
        flagged = crosscheck.check_sweep(client, parent, float(config.checks.tol))
        client.log_metric(parent, "n_suspect_eps", len(flagged))
        # Staged in the sweep's own folder (it stays there, beside the jobs' folders), then logged.
        out = Path(config.hydra.sweep.dir) / "summary"
        try:
            cells = write_summary(client, parent, out)
            client.log_artifacts(parent, str(out), "summary")
            log.info("sweep summary of %d cells logged to parent run %s", len(cells), parent)
        except SummaryError as e:
            log.warning("no summary: %s", e)
        failures = info["failures"]
        client.set_terminated(parent, "FAILED" if failures else "FINISHED")
        os.environ.pop(sw.PARENT_ENV, None)
        log.info("sweep done: %d cells, %d skipped (already FINISHED), %d ran, %d failed",
                 info["n_cells"], info["skipped"], info["ran"], len(failures))
        if failures:
            lines = "\n".join(f"  [{' '.join(f['overrides'])}]: {f['error']}" for f in failures)
            # Hydra turns exceptions from callbacks into warnings; SystemExit gets through, so
            # the command exits 1 with this message on stderr.
            raise SystemExit(f"{len(failures)} of {info['ran']} cells failed (recorded as FAILED "
                             f"runs under parent {parent}):\n{lines}")
