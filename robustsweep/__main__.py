"""``python -m robustsweep [overrides]`` runs one job; ``-m`` sweeps (see README)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from robustsweep.core.device import share_cpu_threads
from robustsweep.core.errors import ConfigError
from robustsweep.core.paths import (
    CONF_DIR,
    install_log_redaction,
    redact_file,
    redact_url,
    redacted_std_streams,
)
from robustsweep.core.schema import LAUNCH_ENV, register_configs

log = logging.getLogger("robustsweep")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _task(cfg: DictConfig) -> dict[str, float]:
    from robustsweep.pipeline import run

    # Joblib and submitit workers import this function, not main(): the job's process starts here.
    install_log_redaction()
    _redact_hydra_files()
    share_cpu_threads()
    try:
        return run(cfg)
    except ConfigError as e:
        # A single run stops with the message alone (exit 2), not a traceback. In a multirun the
        # error propagates, so Hydra records this job as failed and the sweep goes on.
        if HydraConfig.get().mode == RunMode.RUN:
            log.error("configuration error: %s", e)
            sys.exit(2)
        raise
    except SystemExit as e:
        # Hydra records only Exceptions as failed jobs: a sys.exit() deep in a job (ours or a
        # library's) would end the whole sweep. In a multirun it fails this cell only.
        if HydraConfig.get().mode == RunMode.MULTIRUN and e.code not in (0, None):
            raise JobExitError(f"the job called sys.exit({e.code!r})") from e
        raise


class JobExitError(RuntimeError):
    """A job of a multirun called ``sys.exit`` with a failure code."""


def _redact_hydra_files() -> None:
    """Hydra wrote the job's ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` just before
    calling the task (``hydra.core.utils.run_job``), with any password in ``tracking.uri`` or
    ``search.storage`` in clear: rewrite them redacted. Also the sweep's ``multirun.yaml``, for a sweeper
    that does not redact it itself (Hydra's basic one); atomic, so parallel workers may both do it."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    files = []
    if hc.output_subdir is not None:
        folder = Path(hc.runtime.output_dir) / hc.output_subdir
        files += [folder / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if hc.mode == RunMode.MULTIRUN:
        files.append(Path(hc.sweep.dir) / "multirun.yaml")
    for path in files:
        redact_file(path)


def main() -> None:
    os.environ.pop(LAUNCH_ENV, None)  # a new command: its own run/sweep folder (an inherited id is a parent's)
    install_log_redaction()
    register_configs()
    try:
        with redacted_std_streams():  # Hydra prints errors and tracebacks to stderr, not through logging
            _task()
    except SystemExit as e:
        # A message given to SystemExit (the failed cells and their overrides) is printed by Python
        # once main() has returned and the streams are restored: redact it here.
        if isinstance(e.code, str):
            e.code = redact_url(e.code)
        raise


if __name__ == "__main__":
    main()
