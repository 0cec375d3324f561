"""``prune=channel``: structured pruning that removes channels, so the model gets smaller and faster.

Masks from ``torch.nn.utils.prune`` (every other ``prune`` method) leave each weight tensor at full
shape: the model computes exactly as much as before. This method removes the least important
output channels of every convolution (and the input channels, batch-norm entries and residual
partners that depend on them) with Torch-Pruning's dependency graph (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023, arXiv:2301.12900): the result is a smaller dense
network. The top-level ``sparsity`` is the channel ratio: the share of each layer's output
channels removed (channels coupled by a residual connection are removed together).

Importance (``prune.importance``): ``l1``/``l2`` (DepGraph's group magnitude: the channel's weight
norm averaged over every layer it couples -- the convolution's filter, its batch-norm entry, the
next layer's input slice), ``taylor`` (|weight x gradient| of the cross-entropy on
``prune.n_calib`` training images, Molchanov et al. 2019), ``random`` (a control). The classifier
head's outputs (the classes) are never removed; ``prune.exclude`` keeps further layers whole.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from robustsweep.core.params import check, positive_int
from robustsweep.steps.models import meta_model
from robustsweep.steps.prune import LAYER_TYPES, STRUCTURAL, expand_exclude, register_prune

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "taylor", "random")


def _convs(model: nn.Module, exclude: list[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES["conv"]) and not any(fnmatch.fnmatch(n, p) for p in exclude)]


def channel_counts(model: nn.Module, exclude: list[str] | None = None) -> dict[str, int]:
    """Output channels of every prunable convolution, by module name."""
    return {n: int(m.out_channels) for n, m in _convs(model, list(exclude or []))}


def kept(channels: int, ratio: float) -> int:
    """Channels a layer of ``channels`` keeps at ``ratio`` (Torch-Pruning's rounding)."""
    return int(channels * (1 - ratio))


def _check_channel(node: DictConfig, cfg: DictConfig) -> None:
    """Known importance, n_calib, and a ratio that leaves every layer at least one channel (checked
    on the network built on the meta device: shapes only)."""
    check(node.get("importance", "l1") in IMPORTANCES, "prune.importance", node.get("importance"),
          " or ".join(IMPORTANCES))
    positive_int(cfg.prune, "n_calib")
    check(list(node.get("layers") or ["conv"]) == ["conv"], "prune.layers", list(node.get("layers") or []),
          "[conv] (prune=channel removes convolution output channels; a linear head's outputs are classes)")
    exclude = list(node.get("exclude") or [])
    # The wrapped model, as remove_channels sees it: exclude patterns match its names (net.0).
    model = meta_model(cfg)
    exclude = expand_exclude(model, exclude)  # the roles first/last -> module names
    counts = channel_counts(model, exclude)
    if not counts:
        convs = list(channel_counts(model))
        check(not convs, "prune.exclude", exclude,
              f"module-name patterns that leave some of the {len(convs)} convolutions "
              f"({', '.join(convs[:4])}{', ...' if len(convs) > 4 else ''}) unexcluded: these exclude "
              f"every one, so prune=channel would remove nothing")
        check(False, "prune", "channel", f"a model with convolutions to prune (model="
              f"{cfg.model.get('name')!r} has none)")
    smallest = min(counts.values())
    if cfg.sparsity > 0:
        top = 1 - 1 / smallest
        check(kept(smallest, cfg.sparsity) >= 1, "sparsity", cfg.sparsity,
              f"a channel ratio in [0, {top:.4f}] for prune=channel: the narrowest convolution has "
              f"{smallest} output channels and at {cfg.sparsity} would keep none (a whole layer removed)")


STRUCTURAL.add("channel")


@register_prune("channel", check=_check_channel)
def _no_masks(targets: Any, amount: float) -> None:
    raise RuntimeError("prune=channel removes channels (robustsweep.steps.channel.remove_channels, called "
                       "by the compress stage); it attaches no masks")


def remove_channels(model: nn.Module, ratio: float, importance: str, example: torch.Tensor, n_classes: int,
                    exclude: list[str] | None = None, calib: tuple[torch.Tensor, torch.Tensor] | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Remove ``ratio`` of each convolution's output channels in place; returns
    ``sparsity_measured`` (the channel ratio measured over the prunable convolutions) and
    ``params_removed`` (the share of parameters gone). ``example``: one input batch in [0, 1];
    ``calib``: (images in [0, 1], labels) for ``taylor``."""
    import torch_pruning as tp

    exclude = list(exclude or [])
    before = channel_counts(model, exclude)
    params_before = sum(p.numel() for p in model.parameters())
    if ratio <= 0:
        return {"sparsity_measured": 0.0, "params_removed": 0.0}
    imp = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
           "l2": lambda: tp.importance.MagnitudeImportance(p=2),
           "taylor": lambda: tp.importance.TaylorImportance(),
           "random": lambda: tp.importance.RandomImportance()}[importance]()
    # never the classes, nor what the user excludes
    ignored = [m for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) and m.out_features == n_classes)
               or (n and any(fnmatch.fnmatch(n, p) for p in exclude))]
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)  # RandomImportance draws from the global RNG
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored,
                                  global_pruning=False)
    if importance == "taylor":
        if calib is None:
            raise ValueError("prune.importance=taylor needs calibration images")
        model.zero_grad()
        F.cross_entropy(model(calib[0]), calib[1]).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    after = channel_counts(model, exclude)
    removed = sum(before[n] - after.get(n, 0) for n in before) / sum(before.values())
    params_after = sum(p.numel() for p in model.parameters())
    log.info("prune=channel (%s): %d -> %d conv channels (ratio %.4f measured, %.4f asked), %d -> %d params",
             importance, sum(before.values()), sum(after.values()), removed, ratio, params_before, params_after)
    return {"sparsity_measured": removed, "params_removed": 1 - params_after / params_before}
