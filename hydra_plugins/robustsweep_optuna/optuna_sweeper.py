"""robustsweep's Optuna sweeper for Hydra (Optuna >= 4; the released hydra-optuna-sweeper pins
optuna < 3). Hydra imports every ``hydra_plugins`` module at start-up, so this file only
registers the config and defers Optuna, MLflow and torch to ``_impl`` until a search starts.

    python -m robustsweep -m search=cliff                       # conf/search/cliff.yaml
    python -m robustsweep -m search=cliff 'sparsity=interval(0.2, 0.95)' prune=global_l1

Search space: ``hydra.sweeper.params`` and sweep overrides on the command line, in Hydra's
grammar: ``interval(a, b)`` (float), ``range(a, b[, step])`` (stop excluded, as in Hydra),
``choice(a, b)`` or ``a,b`` (categorical, config groups included), ``tag(log, interval(a, b))``.
What to optimise and where the study lives: the task config's ``search`` node
(``robustsweep.config.SearchConfig``).
"""

# No `from __future__ import annotations`: Hydra executes this module without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass
from typing import Any, Dict, List, Optional  # noqa: UP035  (OmegaConf needs typing generics)

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.robustsweep_optuna.optuna_sweeper.OptunaSweeper"
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045  key -> search-space expression


ConfigStore.instance().store(group="hydra/sweeper", name="robustsweep_optuna",
                             node=OptunaSweeperConf, provider="robustsweep")


class OptunaSweeper(Sweeper):
    def __init__(self, params: Optional[Dict[str, str]] = None) -> None:  # noqa: UP006, UP045
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(dict(params or {}))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:  # noqa: UP006
        return self.sweeper.sweep(arguments)
