"""Pruning with ``torch.nn.utils.prune``, made permanent (no mask multiply left in forward).

Methods (``prune.method``):
  none                 dense model
  l1_unstructured      per layer: the ``sparsity`` fraction of smallest-|w| weights of each tensor
  global_l1            global magnitude: smallest-|w| across all selected tensors together
  random_unstructured  per layer, uniformly random weights (seeded): a control for magnitude
  ln_structured        whole conv output channels with the smallest L2 norm (conv layers only;
                       a linear head's rows are classes and are never removed)

With ``prune.finetune_epochs > 0`` the model is fine-tuned while the pruning re-parametrisation
(``weight = weight_orig * weight_mask``) is still in place, so masked weights stay zero; the
masks are made permanent afterwards.

Adding a method: one YAML in conf/prune/ (``method: <yours>``) and one function here decorated
with ``@register_prune("<yours>")`` that applies ``torch.nn.utils.prune`` to ``(module, "weight")``
pairs.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from robustsweep.registry import Registry

log = logging.getLogger(__name__)

Targets = list[tuple[str, nn.Module]]
PRUNE_METHODS: Registry[Callable[[Targets, float], None]] = Registry()
register_prune = PRUNE_METHODS.register

LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
}



@register_prune("none")
def _none(targets: Targets, amount: float) -> None:
    return None


@register_prune("l1_unstructured")
def _l1(targets: Targets, amount: float) -> None:
    for _, m in targets:
        prune.l1_unstructured(m, "weight", amount=amount)


@register_prune("global_l1")
def _global_l1(targets: Targets, amount: float) -> None:
    prune.global_unstructured([(m, "weight") for _, m in targets],
                              pruning_method=prune.L1Unstructured, amount=amount)


@register_prune("random_unstructured")
def _random(targets: Targets, amount: float) -> None:
    for _, m in targets:
        prune.random_unstructured(m, "weight", amount=amount)


@register_prune("ln_structured")
def _ln_structured(targets: Targets, amount: float) -> None:
    for _, m in targets:
        if isinstance(m, LAYER_TYPES["conv"]):  # dim 0 = output channels
            prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)


def select_targets(model: nn.Module, layers: Sequence[str], exclude: Sequence[str] = (),
                   method: str = "") -> Targets:
    """The (name, module) pairs whose ``weight`` is pruned: ``layers`` types minus ``exclude``."""
    types = tuple(t for layer in layers for t in LAYER_TYPES[layer])
    if method == "ln_structured":
        types = tuple(t for t in types if t in LAYER_TYPES["conv"])
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, types) and not any(fnmatch.fnmatch(name, p) for p in exclude)]


def apply_pruning(model: nn.Module, method: str, amount: float, layers: Sequence[str],
                  exclude: Sequence[str] = (), seed: int = 0) -> Targets:
    """Attach pruning masks (not yet permanent); returns the pruned targets."""
    targets = select_targets(model, layers, exclude, method)
    if method != "none" and amount > 0:
        # torch's pruning calls .view(-1) on weights, which fails on channels_last tensors:
        # prune in the default layout, then restore the caller's layout.
        channels_last = any(p.dim() == 4 and not p.is_contiguous()
                            and p.is_contiguous(memory_format=torch.channels_last)
                            for p in model.parameters())
        model.to(memory_format=torch.contiguous_format)
        torch.manual_seed(seed)  # random_unstructured draws from the global RNG
        PRUNE_METHODS[method](targets, amount)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return targets


def make_permanent(targets: Targets) -> None:
    """Fold masks into the weights: the plain ``weight`` parameter keeps the zeros."""
    for _, m in targets:
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def measured_sparsity(targets: Targets) -> float:
    """Zeros / weights over the pruned tensors (what was asked for, measured, not assumed)."""
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    total = sum(m.weight.numel() for _, m in targets)
    return zeros / total if total else 0.0
