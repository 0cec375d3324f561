"""Hydra's basic sweeper, plus robustsweep's value checks on *every* job before the first runs.

Hydra composes each job's config only when the job starts, so with the basic sweeper a typo in
the fifth value of a sweep (``sparsity=0,0.5,1.5``) surfaces after four jobs have trained and
logged. This sweeper composes all jobs up front (as the basic sweeper already does for type
errors) and runs ``robustsweep.config.validate`` on each, so nothing starts unless all are valid.
Heavy imports stay inside the method: Hydra imports every ``hydra_plugins`` module at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import CompactHydraException


class InvalidSweepError(CompactHydraException):
    """Printed by Hydra as its message alone, without a traceback."""


class ValidatingSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from robustsweep.config import ConfigError, validate

        assert self.hydra_context is not None and self.config is not None
        errors = []
        for overrides in batch:
            cfg = self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides))
            try:
                validate(cfg)
            except ConfigError as e:
                errors.append(f"  job [{' '.join(overrides)}]: {e}")
        if errors:
            raise InvalidSweepError(
                f"{len(errors)} of {len(batch)} sweep jobs have invalid values; nothing was run:\n"
                + "\n".join(errors))
