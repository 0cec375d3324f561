"""The compress seam: the stages that turn the dense baseline into the compressed model.

Each stage is a config group with a neutral option (``prune=none``) and a function
``stage(model, cfg) -> Stage``: it changes the model in place and says how to finish the job
(``finalize``, called after the ``defend`` step: pruning keeps its masks attached through a
fine-tune and folds them in afterwards) and what it measured (``sparsity_measured``). Today's
stage is pruning: masks (robustsweep.steps.prune) or, for ``prune=channel``, channel removal
(robustsweep.steps.channel). Further stages plug in in ``STAGES`` order, each declaring its
metric names in ``METRICS``. Stages get the data too (calibration images, the input shape).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from robustsweep.steps.channel import remove_channels
from robustsweep.steps.data import Dataset, to_float
from robustsweep.steps.prune import PRUNE_METHODS, apply_pruning, make_permanent, measured_sparsity
from robustsweep.steps.quantize import METRICS as QUANT_METRICS
from robustsweep.steps.quantize import QUANTIZERS, is_none

log = logging.getLogger(__name__)


@dataclass
class Stage:
    changed: bool  # whether the stage touched the model (a fine-tune only follows a real change)
    finalize: Callable[[], dict[str, float]] = field(default=lambda: {})  # -> measured metrics


def prune_stage(model: nn.Module, cfg: DictConfig, ds: Dataset) -> Stage:
    """``prune.*`` at the top-level ``sparsity``: masks attached now, folded in by finalize
    (``prune=channel``: channels removed now)."""
    node = cfg.prune
    method = PRUNE_METHODS.name_of(node)
    if method == "channel" and not node.get("_target_"):
        return channel_stage(model, cfg, ds)
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


def calibration_images(cfg: DictConfig, ds: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images in [0, 1] and their labels, drawn with the run's seed: the same ones
    for every stage that calibrates (channel importance, int8 observers)."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    idx = torch.randperm(len(ds.y_train), generator=g)[:n]
    x, y = ds.x_train, ds.y_train
    return to_float(x[idx.to(x.device)]), y[idx.to(y.device)]


def channel_stage(model: nn.Module, cfg: DictConfig, ds: Dataset) -> Stage:
    """``prune=channel``: the least important channels removed (a smaller dense model); a
    fine-tune after it trains the smaller model."""
    node = cfg.prune
    device = next(model.parameters()).device
    calib = None
    if node.get("importance") == "taylor":
        x, y = calibration_images(cfg, ds, int(node.n_calib))
        calib = (x.to(device), y.to(device))
    measured = remove_channels(model, float(cfg.sparsity), str(node.get("importance", "l1")),
                               to_float(ds.x_test[:2]).to(device), len(ds.classes),
                               list(node.get("exclude") or []), calib, seed=int(cfg.seed))
    return Stage(changed=cfg.sparsity > 0, finalize=lambda: measured)


def quantize_stage(model: nn.Module, cfg: DictConfig, ds: Dataset) -> Stage:
    """``quantize.*``: post-training quantization, applied in finalize -- after pruning's masks are
    folded in and after any fine-tune -- so it quantizes the model that would be shipped."""
    node = cfg.get("quantize")
    if is_none(node):
        return Stage(changed=False)
    fn = QUANTIZERS.resolve(node)
    n_calib = int(node.get("n_calib") or 0)

    def calib() -> torch.Tensor:  # decoded only if the method asks (the training split is lazy)
        return calibration_images(cfg, ds, n_calib)[0]

    return Stage(changed=False, finalize=lambda: fn(model, node, calib))


# In order. Each: (config group, stage function).
STAGES: tuple[tuple[str, Callable[[nn.Module, DictConfig, Dataset], Stage]], ...] = (
    ("prune", prune_stage), ("quantize", quantize_stage))
# every metric a stage's finalize may return
METRICS: tuple[str, ...] = ("sparsity_measured", "params_removed", *QUANT_METRICS)


def compress(model: nn.Module, cfg: DictConfig, ds: Dataset) -> list[Stage]:
    """Apply every stage to ``model`` in place; finalize them (``finalize``) after ``defend``."""
    return [stage(model, cfg, ds) for _, stage in STAGES]


def finalize(stages: list[Stage]) -> dict[str, float]:
    """Finish every stage (e.g. fold pruning masks in); what they measured."""
    measured: dict[str, float] = {}
    for s in stages:
        measured.update(s.finalize())
    return measured
