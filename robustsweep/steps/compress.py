"""The compress seam: the stages that turn the dense baseline into the compressed model.

Each stage is a config group with a neutral option (``prune=none``) and a function
``stage(model, cfg) -> Stage``: it changes the model in place and says how to finish the job
(``finalize``, called after the ``defend`` step: pruning keeps its masks attached through a
fine-tune and folds them in afterwards) and what it measured (``sparsity_measured``). Today's
stage is pruning (robustsweep.steps.prune); quantization or physical channel removal plug in as
further stages, in ``STAGES`` order, each declaring its metric names in ``METRICS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from omegaconf import DictConfig
from torch import nn

from robustsweep.steps.prune import PRUNE_METHODS, apply_pruning, make_permanent, measured_sparsity

log = logging.getLogger(__name__)


@dataclass
class Stage:
    changed: bool  # whether the stage touched the model (a fine-tune only follows a real change)
    finalize: Callable[[], dict[str, float]] = field(default=lambda: {})  # -> measured metrics


def prune_stage(model: nn.Module, cfg: DictConfig) -> Stage:
    """``prune.*`` at the top-level ``sparsity``: masks attached now, folded in by finalize."""
    node = cfg.prune
    method = PRUNE_METHODS.name_of(node)
    targets = apply_pruning(model, node, cfg.sparsity, node.layers, node.get("exclude") or (), seed=cfg.seed)

    def finalize() -> dict[str, float]:
        make_permanent(targets)
        sparsity = measured_sparsity(targets)
        if method == "none" and cfg.sparsity > 0:
            log.warning("prune.method=none: sparsity=%s is ignored (measured %.4f)", cfg.sparsity, sparsity)
        log.info("pruned %d tensors with %s to measured sparsity %.4f (asked %.4f)",
                 len(targets), method, sparsity, cfg.sparsity)
        return {"sparsity_measured": sparsity}

    return Stage(changed=method != "none" and cfg.sparsity > 0, finalize=finalize)


# In order. Each: (config group, stage function).
STAGES: tuple[tuple[str, Callable[[nn.Module, DictConfig], Stage]], ...] = (("prune", prune_stage),)
METRICS: tuple[str, ...] = ("sparsity_measured",)  # every metric a stage's finalize may return


def compress(model: nn.Module, cfg: DictConfig) -> list[Stage]:
    """Apply every stage to ``model`` in place; finalize them (``finalize``) after ``defend``."""
    return [stage(model, cfg) for _, stage in STAGES]


def finalize(stages: list[Stage]) -> dict[str, float]:
    """Finish every stage (e.g. fold pruning masks in); what they measured."""
    measured: dict[str, float] = {}
    for s in stages:
        measured.update(s.finalize())
    return measured
