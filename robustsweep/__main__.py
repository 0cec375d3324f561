"""``python -m robustsweep [overrides]`` runs one job; ``-m`` sweeps (see README)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from robustsweep.core.errors import ConfigError
from robustsweep.core.paths import CONF_DIR
from robustsweep.core.schema import register_configs

log = logging.getLogger("robustsweep")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _task(cfg: DictConfig) -> dict[str, float]:
    from robustsweep.pipeline import run

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


def main() -> None:
    register_configs()
    _task()


if __name__ == "__main__":
    main()
