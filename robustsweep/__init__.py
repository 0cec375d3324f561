"""robustsweep: how far can a model be pruned before its adversarial robustness collapses?

Public API (small on purpose):
    run(cfg) -> dict        one prune -> attack -> attribute job, logged as one MLflow run
    compose(overrides)      the CLI's config, composed without running anything
    parse_epsilon("8/255")  eps in [0, 1] pixel units
"""

from robustsweep.config import ConfigError, compose, parse_epsilon


def run(cfg):  # type: ignore[no-untyped-def]  (lazy: importing the package stays cheap)
    """Run one job; see robustsweep.pipeline.run."""
    from robustsweep.pipeline import run as _run

    return _run(cfg)


__all__ = ["ConfigError", "compose", "parse_epsilon", "run"]
__version__ = "0.1.0"
