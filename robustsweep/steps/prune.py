"""Pruning with ``torch.nn.utils.prune``, made permanent (no mask multiply left in forward).

Methods (``prune.method``):
  none                 dense model
  l1_unstructured      per layer: the ``sparsity`` fraction of smallest-|w| weights of each tensor
  global_l1            global magnitude: smallest-|w| across all selected tensors together
  random_unstructured  per layer, uniformly random weights (seeded): a control for magnitude
  ln_structured        whole conv output channels with the smallest L2 norm (conv layers only;
                       a linear head's rows are classes and are never removed)

The masks stay attached (``weight = weight_orig * weight_mask``) until ``make_permanent``, so a
fine-tune after pruning (the ``defend`` step) keeps masked weights at zero.

Schedule (``prune.schedule``): ``oneshot`` prunes to ``sparsity`` at once; ``gradual`` in
``prune.steps`` steps on the cubic schedule of Zhu & Gupta ("To prune, or not to prune", ICLR-W
2018, arXiv:1710.01878): s_t = s_f * (1 - (1 - t/n)^3), t = 1..n, each step followed by the
``defend`` fine-tune (robustsweep.steps.compress). Each step folds the masks in and prunes the
current weights to s_t: the zeros of earlier steps are the smallest magnitudes, so they stay
pruned, and the last step prunes exactly as many weights as one-shot would (magnitude methods only).

``prune.exclude``: module-name patterns, and the roles ``first`` (the stem: the first convolution)
and ``last`` (the classifier: the last linear layer), found from the model.

Adding a method: one YAML in conf/prune/ with ``_target_: <pkg.module.fn>`` (or ``method: <yours>``
and one function here decorated with ``@register_prune("<yours>")``): ``fn(targets, amount)`` that
applies ``torch.nn.utils.prune`` to the ``(name, module)`` pairs' ``weight``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from robustsweep.core.params import check
from robustsweep.core.registry import Registry
from robustsweep.steps.models import meta_model

log = logging.getLogger(__name__)

Targets = list[tuple[str, nn.Module]]
# prune=channel (robustsweep.steps.channel) registers itself when first looked up
PRUNE_METHODS: Registry[Callable[[Targets, float], None]] = Registry(
    "prune", key="method", plugins=("robustsweep.steps.channel", "robustsweep.steps.hydra"))
register_prune = PRUNE_METHODS.register
# methods that change the architecture instead of attaching masks (the compress stage calls them;
# apply_pruning refuses them): prune=channel
STRUCTURAL: set[str] = set()
# methods that train before they mask (the compress stage calls them): prune=hydra
TRAINED: set[str] = set()


def mask_methods() -> list[str]:
    """The registered methods that attach ``torch.nn.utils.prune`` masks (all but ``none`` and STRUCTURAL)."""
    return sorted(set(PRUNE_METHODS) - STRUCTURAL - TRAINED - {"none"})

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


# prune.exclude roles: what each names in a model (None: the model has no such layer)
ROLES: dict[str, Callable[[nn.Module], str | None]] = {
    "first": lambda model: next((n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES["conv"])),
                                None),
    "last": lambda model: next((n for n, m in reversed(list(model.named_modules()))
                                if isinstance(m, nn.Linear)), None),
}
ROLE_WORDS = {"first": "convolution for first (the stem)", "last": "linear layer for last (the classifier)"}


def expand_exclude(model: nn.Module, exclude: Sequence[str], key: str = "prune.exclude") -> list[str]:
    """``exclude`` with the roles ``first``/``last`` replaced by the module names they find in
    ``model``; a role the model lacks is a ConfigError naming ``key``."""
    out = []
    for p in exclude:
        if p in ROLES:
            name = ROLES[p](model)
            check(name is not None, key, list(exclude),
                  f"module-name patterns or first/last, where the model has them: it has no {ROLE_WORDS[p]}")
            out.append(str(name))
        else:
            out.append(p)
    return out


def excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether module ``name`` matches a pattern of an expanded ``exclude``."""
    return any(fnmatch.fnmatch(name, p) for p in exclude)


def select_targets(model: nn.Module, layers: Sequence[str], exclude: Sequence[str] = (),
                   method: str = "") -> Targets:
    """The (name, module) pairs whose ``weight`` is pruned: ``layers`` types minus ``exclude``
    (patterns, or the roles first/last)."""
    types = tuple(t for layer in layers for t in LAYER_TYPES[layer])
    if method == "ln_structured":
        types = tuple(t for t in types if t in LAYER_TYPES["conv"])
    exclude = expand_exclude(model, exclude)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, types) and not excluded(name, exclude)]


SCHEDULES = ("oneshot", "gradual")
# methods whose gradual steps keep earlier zeros pruned (they rank current magnitudes); random
# would draw afresh each step and revive weights, channel removal changes the architecture
GRADUAL_METHODS = ("l1_unstructured", "global_l1", "ln_structured")


def schedule(node: DictConfig, sparsity: float) -> list[float]:
    """The sparsity after each pruning step: ``[sparsity]`` one-shot, or Zhu & Gupta's cubic
    ramp s_t = s_f * (1 - (1 - t/n)^3), t = 1..n, for ``prune.schedule=gradual``."""
    if node.get("schedule", "oneshot") != "gradual":
        return [sparsity]
    n = int(node.steps)
    return [sparsity * (1 - (1 - t / n) ** 3) for t in range(1, n + 1)]


def check_schedule(node: DictConfig, cfg: DictConfig) -> None:
    """``prune.schedule``/``prune.steps``: gradual needs steps >= 1, a magnitude method and a
    ``defend`` fine-tune between the steps."""
    sched = node.get("schedule", "oneshot")
    check(sched in SCHEDULES, "prune.schedule", sched, " or ".join(SCHEDULES))
    if sched != "gradual":
        return
    steps = node.get("steps")
    check(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, "prune.steps", steps,
          "an integer >= 1 (pruning steps of prune.schedule=gradual)")
    method = PRUNE_METHODS.name_of(node)
    check(method in GRADUAL_METHODS or bool(node.get("_target_")), "prune.schedule", sched,
          f"oneshot for prune={method} (gradual: prune={', '.join(GRADUAL_METHODS)} or a _target_ method)")
    defend = cfg.get("defend")
    check(isinstance(defend, DictConfig) and defend.get("name", "none") != "none", "prune.schedule", sched,
          "oneshot without a fine-tune: gradual pruning fine-tunes after each step with the defend "
          "objective (add defend=clean, defend=pgd_at, ...)")


def check_prune_config(node: DictConfig, cfg: DictConfig) -> None:
    """``prune.*``: a known method (or ``_target_``), layer types, and ``layers``/``exclude`` that
    leave the model something to prune (``prune=channel`` checks its own, in channel.py)."""
    PRUNE_METHODS.validate(node, cfg)
    layers = list(node.get("layers") or [])
    bad = set(layers) - set(LAYER_TYPES)
    check(not bad and len(layers) > 0, "prune.layers", layers,
          f"a non-empty subset of [{', '.join(LAYER_TYPES)}]")
    check_schedule(node, cfg)
    if not node.get("_target_") and (node.get("method") == "none" or node.get("method") in STRUCTURAL):
        return
    # Matched against the model as the run prunes it (names net.*), built on the meta device.
    model = meta_model(cfg)
    exclude = list(node.get("exclude") or [])
    expand_exclude(model, exclude)  # a role the model lacks: refused here
    if not select_targets(model, layers, exclude, PRUNE_METHODS.name_of(node)):
        whole = select_targets(model, layers, (), PRUNE_METHODS.name_of(node))
        if whole:
            check(False, "prune.exclude", exclude,
                  f"module-name patterns that leave some of the {len(whole)} prunable layers "
                  f"({', '.join(n for n, _ in whole[:4])}{', ...' if len(whole) > 4 else ''}) unexcluded: "
                  f"these exclude every one, so nothing would be pruned")
        check(False, "prune.layers", layers, f"layer types model={cfg.model.get('name')!r} has")


def apply_pruning(model: nn.Module, method: str | DictConfig, amount: float, layers: Sequence[str],
                  exclude: Sequence[str] = (), seed: int = 0) -> Targets:
    """Attach pruning masks (not yet permanent); returns the pruned targets. ``method``: a
    registered name, or the ``prune`` node (which may name a ``_target_``)."""
    node = method if isinstance(method, DictConfig) else DictConfig({"method": method})
    name = PRUNE_METHODS.name_of(node)
    fn = PRUNE_METHODS.resolve(node)
    targets = select_targets(model, layers, exclude, name)
    prune_targets(targets, fn, name, amount, model, seed)
    return targets


def prune_targets(targets: Targets, fn: Callable[[Targets, float], None], name: str, amount: float,
                  model: nn.Module, seed: int = 0) -> None:
    """Attach ``fn``'s masks at ``amount`` to ``targets`` (of ``model``)."""
    if name != "none" and amount > 0:
        # torch's pruning calls .view(-1) on weights, which fails on channels_last tensors:
        # prune in the default layout, then restore the caller's layout.
        channels_last = any(p.dim() == 4 and not p.is_contiguous()
                            and p.is_contiguous(memory_format=torch.channels_last)
                            for p in model.parameters())
        model.to(memory_format=torch.contiguous_format)
        torch.manual_seed(seed)  # random_unstructured draws from the global RNG
        fn(targets, amount)
        if channels_last:
            model.to(memory_format=torch.channels_last)


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
