"""robustsweep: how far can a model be compressed before its adversarial robustness collapses?

Public API (small on purpose):
    run(cfg) -> dict        one cell (compress -> defend -> evaluate), logged as one MLflow run
    compose(overrides)      the CLI's config, composed without running anything
    parse_epsilon("8/255")  eps in [0, 1] pixel units
    ConfigError             what every bad value raises (the message names key, value, allowed)

Attributes are imported on first use, so ``import robustsweep`` (and the CLI's ``--help``) stays
cheap: torch, MLflow and the evaluators' libraries load only when a job needs them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "compose", "parse_epsilon", "run"]
__version__ = "0.1.0"

_WHERE = {"ConfigError": "robustsweep.core.errors", "parse_epsilon": "robustsweep.core.params",
          "compose": "robustsweep.config", "run": "robustsweep.pipeline"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'robustsweep' has no attribute {name!r}")
