"""The compress seam: the stages that turn the dense baseline into the compressed model.

Each stage is a config group with a neutral option (``prune=none``) and a function
``stage(model, cfg) -> Stage``: it changes the model in place and says how to finish the job
(``finalize``, called after the ``defend`` step: pruning keeps its masks attached through a
fine-tune and folds them in afterwards) and what it measured (``sparsity_measured``). Today's
stages, in order: pruning -- masks (robustsweep.steps.prune), one-shot or gradual, or for
``prune=channel`` channel removal (robustsweep.steps.channel) --, BatchNorm recalibration
(``compress.bn_recalibrate``), quantization. Each is a ``StageSpec`` given to ``register_stage``:
its config group, its place in the order, the metrics it measures and its fragment of a
compression label (summary, report); another package registers one the same way
(robustsweep.core.plugins). Stages get the data too (calibration images, the input
shape) and the fine-tune (``finetune``: the ``defend`` step, which gradual pruning runs between
its steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from robustsweep.core import plugins
from robustsweep.core.params import check
from robustsweep.core.registry import is_off
from robustsweep.core.schema import OPTIONAL_GROUPS
from robustsweep.core.stats import mcnemar, paired_bootstrap
from robustsweep.steps import hydra
from robustsweep.steps.channel import remove_channels
from robustsweep.steps.data import Dataset, to_float, train_size
from robustsweep.steps.models import meta_model
from robustsweep.steps.prune import (
    PRUNE_METHODS,
    Targets,
    check_prune_config,
    expand_exclude,
    make_permanent,
    measured_sparsity,
    prune_targets,
    schedule,
    select_targets,
)
from robustsweep.steps.quantize import METRICS as QUANT_METRICS
from robustsweep.steps.quantize import QUANTIZERS, check_quantize_config
from robustsweep.steps.train import correct

log = logging.getLogger(__name__)


Finetune = Callable[[], None]  # the defend step's fine-tune of the model being compressed


@dataclass
class Stage:
    changed: bool  # whether the stage touched the model (a fine-tune only follows a real change)
    finalize: Callable[[], dict[str, float]] = field(default=lambda: {})  # -> measured metrics
    compresses: bool = False  # whether the shipped model differs from the dense one because of it
    after_compression: bool = False  # finalize only if another stage compresses (BN recalibration)


def prune_stage(model: nn.Module, cfg: DictConfig, ds: Dataset, finetune: Finetune) -> Stage:
    """``prune.*`` at the top-level ``sparsity``: masks attached now (gradually: each step but the
    last followed by ``finetune``), folded in by finalize (``prune=channel``: channels removed now)."""
    node = cfg.prune
    method = PRUNE_METHODS.name_of(node)
    if method in OWN_STAGES and not node.get("_target_"):
        return OWN_STAGES[method](model, cfg, ds, finetune)
    fn = PRUNE_METHODS.resolve(node)
    targets = select_targets(model, node.layers, node.get("exclude") or (), method)
    steps = schedule(node, float(cfg.sparsity)) if method != "none" and cfg.sparsity > 0 else [0.0]
    for i, s in enumerate(steps):
        if i:  # gradual: fine-tune the previous step, fold its masks in, prune the current weights to s
            finetune()
            make_permanent(targets)
            log.info("gradual pruning: step %d/%d to sparsity %.4f (measured before: %.4f)", i + 1,
                     len(steps), s, measured_sparsity(targets))
        prune_targets(targets, fn, method, s, model, seed=int(cfg.seed))
    return _masks_stage(targets, method, cfg)


def _masks_stage(targets: Targets, method: str, cfg: DictConfig,
                 measured: dict[str, float] | None = None) -> Stage:
    """The stage of a method that attached masks: finalize folds them in and measures the sparsity."""

    def finalize() -> dict[str, float]:
        make_permanent(targets)
        sparsity = measured_sparsity(targets)
        if method == "none" and cfg.sparsity > 0:
            log.warning("prune.method=none: sparsity=%s is ignored (measured %.4f)", cfg.sparsity, sparsity)
        log.info("pruned %d tensors with %s to measured sparsity %.4f (asked %.4f)",
                 len(targets), method, sparsity, cfg.sparsity)
        return {"sparsity_measured": sparsity, **(measured or {})}

    changed = method != "none" and cfg.sparsity > 0
    return Stage(changed=changed, finalize=finalize, compresses=changed)


def calibration_images(cfg: DictConfig, ds: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images in [0, 1] and their labels, drawn with the run's seed: the same ones
    for every stage that calibrates (channel importance, int8 observers)."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    idx = torch.randperm(len(ds.y_train), generator=g)[:n]
    x, y = ds.x_train, ds.y_train
    return to_float(x[idx.to(x.device)]), y[idx.to(y.device)]


def channel_stage(model: nn.Module, cfg: DictConfig, ds: Dataset, finetune: Finetune) -> Stage:
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
                               expand_exclude(model, list(node.get("exclude") or [])), calib,
                               seed=int(cfg.seed))
    return Stage(changed=cfg.sparsity > 0, finalize=lambda: measured, compresses=cfg.sparsity > 0)


def hydra_stage(model: nn.Module, cfg: DictConfig, ds: Dataset, finetune: Finetune) -> Stage:
    """``prune=hydra``: importance scores trained on the defend objective's loss with the weights
    frozen, their top-k mask attached (robustsweep.steps.hydra); the defend step fine-tunes after."""
    node = cfg.prune
    targets = select_targets(model, node.layers, node.get("exclude") or (), "hydra")
    measured = {}
    if cfg.sparsity > 0:
        masks, moved = hydra.train_scores(model, targets, float(cfg.sparsity), node, cfg, ds)
        hydra.attach(targets, masks)
        measured["hydra_mask_moved"] = moved
    return _masks_stage(targets, "hydra", cfg, measured)


def bn_images(cfg: DictConfig) -> Any:
    """``compress.bn_recalibrate`` as written (0 when the config has no compress node)."""
    return cfg.compress.get("bn_recalibrate", 0) if cfg.get("compress") is not None else 0


def check_compress_config(cfg: DictConfig) -> None:
    """``compress.bn_recalibrate``: 0 (off) or a number of training images up to the training
    split's size, on a model that has BatchNorm layers."""
    n = bn_images(cfg)
    if n == 0:
        return
    size = train_size(cfg.data)
    top = f"[0, {size}]" if size else ">= 0"
    check(isinstance(n, int) and not isinstance(n, bool) and n > 0 and (size is None or n <= size),
          "compress.bn_recalibrate", n, f"an integer in {top}: training images whose batch statistics replace "
          f"the BatchNorm running statistics after compression (0 = off)")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in meta_model(cfg).modules())
    check(has_bn, "compress.bn_recalibrate", n,
          f"0 for model={cfg.model.get('name') or cfg.model.get('_target_')!r}: it has no BatchNorm layers")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them from ``x`` (images in
    [0, 1]) in train mode, as a cumulative average over the batches (adaptive BN: Li et al.,
    "EagleEye", ECCV 2020; NNCF's ``num_bn_adaptation_samples``). torch's own
    ``torch.optim.swa_utils.update_bn`` does exactly this; the model is returned in eval mode."""
    torch.optim.swa_utils.update_bn((x[i:i + batch_size] for i in range(0, len(x), batch_size)), model)
    model.eval()


def bn_stage(model: nn.Module, cfg: DictConfig, ds: Dataset, finetune: Finetune) -> Stage:
    """``compress.bn_recalibrate`` images: after pruning (and any fine-tune), before quantization,
    the BatchNorm statistics re-estimated for the compressed network. Only when another stage
    compressed the model: the dense reference stays the baseline. Measures the accuracy on the whole
    test split (not the eval subset: the compressed model is shared by cells whatever their
    ``data.n_eval``) before (``test_acc_stale_bn``) and the change (``bn_recal_gain``)."""
    n = int(bn_images(cfg))
    if n == 0:
        return Stage(changed=False)

    def finalize() -> dict[str, float]:
        device = next(model.parameters()).device
        x = calibration_images(cfg, ds, n)[0].to(device)
        before = correct(model, ds.x_test, ds.y_test)
        recalibrate_bn(model, x)
        after = correct(model, ds.x_test, ds.y_test)
        # the same images before and after: a paired interval and McNemar's test
        gain, lo, hi = paired_bootstrap(before, after)
        log.info("BatchNorm recalibrated on %d training images: test accuracy %.4f -> %.4f, change %+.4f "
                 "[%+.4f, %+.4f] (%d test images)", n, before.mean(), after.mean(), gain, lo, hi, len(before))
        return {"test_acc_stale_bn": float(before.mean()), "bn_recal_gain": gain, "bn_recal_gain_lo": lo,
                "bn_recal_gain_hi": hi, "bn_recal_mcnemar_p": mcnemar(before, after)}

    return Stage(changed=False, finalize=finalize, after_compression=True)


def quantize_stage(model: nn.Module, cfg: DictConfig, ds: Dataset, finetune: Finetune) -> Stage:
    """``quantize.*``: post-training quantization, applied in finalize -- after pruning's masks are
    folded in and after any fine-tune -- so it quantizes the model that would be shipped."""
    node = cfg.get("quantize")
    if is_off(node):
        return Stage(changed=False)
    fn = QUANTIZERS.resolve(node)
    n_calib = int(node.get("n_calib") or 0)

    def calib() -> torch.Tensor:  # decoded only if the method asks (the training split is lazy)
        return calibration_images(cfg, ds, n_calib)[0]

    return Stage(changed=False, finalize=lambda: fn(model, node, calib), compresses=True)


# prune methods that are a whole stage of their own (they change the architecture or train first)
OWN_STAGES: dict[str, Callable[[nn.Module, DictConfig, Dataset, Finetune], Stage]] = {
    "channel": channel_stage, "hydra": hydra_stage}

StageFn = Callable[[nn.Module, DictConfig, Dataset, Finetune], Stage]


@dataclass(frozen=True)
class StageSpec:
    """A compression stage as declared where it is registered."""

    group: str  # the config node that configures it (a plug-in's own group is None until chosen)
    fn: StageFn
    order: int  # where it runs: prune 10, BatchNorm recalibration 20, quantize 30
    metrics: tuple[str, ...] = ()  # every metric its finalize may return
    # Its fragment of a compression label from the cell's params as the store holds them
    # ({"prune.method": "global_l1", "sparsity": 0.5, ...}): "global_l1 0.50", "int8"; None when off
    label: Callable[[Mapping[str, Any]], str | None] = lambda params: None
    # its key checks, check(node, cfg), before anything runs (validate() asks every stage whose
    # group the config has)
    check: Callable[[Any, DictConfig], None] | None = None


_STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    _STAGES[spec.group] = spec
    return spec


def stages() -> list[StageSpec]:
    """Every registered stage in order, other packages' included (robustsweep.core.plugins)."""
    plugins.load()
    return sorted(_STAGES.values(), key=lambda s: (s.order, s.group))


def stage_metrics() -> tuple[str, ...]:
    return tuple(m for spec in stages() for m in spec.metrics)


def _off(value: Any) -> bool:
    return value is None or str(value) in ("none", "None", "")


def _prune_label(params: Mapping[str, Any]) -> str | None:
    method, sparsity = params.get("prune.method") or "none", float(params.get("sparsity") or 0)
    return None if _off(method) or not sparsity else f"{method} {sparsity:.2f}"


def _quantize_label(params: Mapping[str, Any]) -> str | None:
    q = params.get("quantize.name")
    if _off(q):
        return None
    return f"{q} {params['quantize.bits']}b" if params.get("quantize.bits") else str(q)


register_stage(StageSpec("prune", prune_stage, 10, ("sparsity_measured", "params_removed", "hydra_mask_moved"),
                         _prune_label, check=check_prune_config))
register_stage(StageSpec("compress", bn_stage, 20, ("test_acc_stale_bn", "bn_recal_gain", "bn_recal_gain_lo",
                                                    "bn_recal_gain_hi", "bn_recal_mcnemar_p"),
                         check=lambda node, cfg: check_compress_config(cfg)))
register_stage(StageSpec("quantize", quantize_stage, 30, tuple(QUANT_METRICS), _quantize_label,
                         check=check_quantize_config))


def check_stages(cfg: DictConfig) -> None:
    """Every stage's own checks (validate() asks), on its node; a stage whose group the config does
    not have (a plug-in's, not chosen) is off and not checked."""
    for spec in stages():
        node = cfg.get(spec.group)
        if spec.check is not None and (node is not None or spec.group not in OPTIONAL_GROUPS):
            spec.check(node, cfg)


def compress(model: nn.Module, cfg: DictConfig, ds: Dataset, finetune: Finetune | None = None) -> list[Stage]:
    """Apply every stage to ``model`` in place; finalize them (``finalize``) after ``defend``.
    ``finetune``: the defend step (gradual pruning calls it between its steps). A stage whose group
    the config does not have (a plug-in's, not chosen) is skipped."""
    return [spec.fn(model, cfg, ds, finetune or (lambda: None)) for spec in stages()
            if cfg.get(spec.group) is not None or spec.group not in OPTIONAL_GROUPS]


def finalize(stages: list[Stage]) -> dict[str, float]:
    """Finish every stage in order (fold pruning masks in, recalibrate BatchNorm, quantize); what
    they measured."""
    measured: dict[str, float] = {}
    compressed = any(s.compresses for s in stages)
    for s in stages:
        if compressed or not s.after_compression:
            measured.update(s.finalize())
    return measured
