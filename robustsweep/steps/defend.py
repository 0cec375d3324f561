"""The defend step: fine-tuning after compression with any training objective (group ``defend``).

``defend=none`` (default) leaves the compressed model as it is. ``defend=<objective>`` fine-tunes
it for ``defend.epochs`` at peak learning rate ``defend.lr`` with the baseline's recipe
(``train.*``) and that objective (robustsweep.steps.train.OBJECTIVES), while the compression is
still in place (pruning masks attached: pruned weights stay zero). A model that compression left
unchanged (``sparsity=0``, ``prune=none``) is not fine-tuned: it stays the dense reference.

Before ``defend`` existed the fine-tune was ``prune.finetune_epochs`` / ``prune.finetune_lr``;
robustsweep.config turns that spelling into ``defend=clean`` (with a deprecation warning).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from torch import nn

from robustsweep.core.params import check, nonnegative_int, positive_int, positive_number
from robustsweep.core.registry import is_off
from robustsweep.steps.data import Dataset
from robustsweep.steps.train import OBJECTIVES, train_model

log = logging.getLogger(__name__)
NONE = "none"


def check_defend_config(cfg: DictConfig) -> None:
    node = cfg.defend  # a config node: validate() checks that before asking the components
    if is_off(node):
        nonnegative_int(cfg.defend, "epochs")
        return
    check(node.get("name") in OBJECTIVES or bool(node.get("_target_")), "defend.name", node.get("name"),
          f"{NONE}, {', '.join(sorted(OBJECTIVES))}")
    OBJECTIVES.validate(node, cfg)
    positive_int(cfg.defend, "epochs")
    positive_number(cfg.defend, "lr")


def defend(model: nn.Module, cfg: DictConfig, ds: Dataset, changed: bool) -> None:
    """Fine-tune ``model`` in place when ``defend`` asks for it and compression ``changed`` it."""
    node = cfg.defend
    if is_off(node) or not changed:
        return
    log.info("defend: fine-tuning the compressed model with objective %s for %d epoch(s), lr %g",
             OBJECTIVES.name_of(node), node.epochs, node.lr)
    train_model(model, ds, cfg.train, seed=cfg.seed, epochs=node.epochs, lr=node.lr, desc="finetune",
                objective=node)
