"""``prune=hydra``: robustness-aware pruning by learned importance scores.

HYDRA (Sehwag, Wang, Mittal & Jana, "HYDRA: Pruning Adversarially Robust Neural Networks",
NeurIPS 2020, arXiv:2002.10509; the authors' code: github.com/inspire-group/hydra). Every pruned
weight tensor gets a score tensor of its shape; the network computes with ``w * mask`` where the
mask keeps the top-k scores by magnitude (``k`` = the share of weights kept, per layer or over all
layers together: ``prune.scope``). The scores -- and only the scores: weights, biases and
BatchNorm parameters are frozen -- are trained for ``prune.score_epochs`` at learning rate
``prune.score_lr`` to minimise the robust loss of the ``defend`` objective (``pgd_at`` in the
paper; ``trades``, ``fast_at`` and ``clean`` too), the mask's gradient passed straight through to
the scores as in the authors' ``GetSubnet``. As there, scores start from the weights scaled per layer,
``sqrt(6 / fan_in) * w / max|w|`` (``initialize_scaled_score``), so that the first mask is
the magnitude mask. The final mask (top-k of |score|) is attached with ``torch.nn.utils.prune``
like every other method and the ``defend`` step then fine-tunes the kept weights (HYDRA's third
phase).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import parametrize, prune

from robustsweep.core.params import check, positive_int, positive_number
from robustsweep.steps.data import Dataset
from robustsweep.steps.prune import TRAINED, Targets, register_prune
from robustsweep.steps.train import train_model

log = logging.getLogger(__name__)

SCOPES = ("layer", "global")
# defend objectives whose loss the scores can be trained on (a loss of the model's logits)
SCORE_OBJECTIVES = ("pgd_at", "trades", "fast_at", "clean")


class _TopK(torch.autograd.Function):
    """The mask (1 where |score| is at or above ``threshold``) forward, the gradient straight
    through to the scores backward (HYDRA's ``GetSubnet``)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return (scores.abs() >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def kth_largest(values: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep``-th largest of ``values`` (flattened): |score| at or above it is kept."""
    flat = values.detach().flatten()
    return torch.kthvalue(flat, flat.numel() - keep + 1).values


class Scores:
    """The score tensors of the pruned layers and the thresholds their masks use. Thresholds are
    recomputed only when a score changed (the optimiser bumps a tensor's version): an adversarial
    objective runs many forwards per optimiser step."""

    def __init__(self, targets: Targets, amount: float, scope: str) -> None:
        self.scores: list[nn.Parameter] = []
        for _, m in targets:
            w = m.weight.detach()
            fan_in = w[0].numel()
            self.scores.append(nn.Parameter(math.sqrt(6 / fan_in) * w / w.abs().max().clamp_min(1e-12)))
        self.keep = [max(1, round((1 - amount) * s.numel())) for s in self.scores]
        self.scope = scope
        self._key: tuple[int, ...] | None = None
        self._thresholds: list[torch.Tensor] = []

    def thresholds(self) -> list[torch.Tensor]:
        key = tuple(s._version for s in self.scores)
        if key != self._key:
            if self.scope == "global":
                t = kth_largest(torch.cat([s.detach().abs().flatten() for s in self.scores]), sum(self.keep))
                self._thresholds = [t] * len(self.scores)
            else:
                pairs = zip(self.scores, self.keep, strict=True)
                self._thresholds = [kth_largest(s.abs(), k) for s, k in pairs]
            self._key = key
        return self._thresholds

    def masks(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [(s.abs() >= t).to(s.dtype) for s, t in zip(self.scores, self.thresholds(), strict=True)]


class _Masked(nn.Module):
    """The parametrization ``weight -> weight * mask(scores)`` of one layer."""

    def __init__(self, bank: Scores, i: int) -> None:
        super().__init__()
        self.bank, self.i = bank, i
        self.scores = bank.scores[i]  # registered here, so the model's parameters include it

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * _TopK.apply(self.scores, self.bank.thresholds()[self.i])


def train_scores(model: nn.Module, targets: Targets, amount: float, node: DictConfig, cfg: DictConfig,
                 ds: Dataset) -> tuple[list[torch.Tensor], float]:
    """HYDRA's pruning phase: scores trained with every model parameter frozen; returns the final
    masks (top-k of |score|), one per target, and the share of kept weights that the initial
    (magnitude-ordered) mask did not keep. The weights are left exactly as they were."""
    bank = Scores(targets, amount, str(node.get("scope", "layer")))
    initial = bank.masks()
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    for i, (_, m) in enumerate(targets):
        parametrize.register_parametrization(m, "weight", _Masked(bank, i), unsafe=True)
    try:
        log.info("hydra: training importance scores of %d tensors for %d epoch(s), lr %g, objective %s, "
                 "keeping %.4f of the weights (%s)", len(targets), node.score_epochs, node.score_lr,
                 cfg.defend.get("name"), 1 - amount, bank.scope)
        train_model(model, ds, cfg.train, seed=int(cfg.seed), epochs=int(node.score_epochs),
                    lr=float(node.score_lr), desc="hydra scores", objective=cfg.defend)
        masks = bank.masks()
        kept = sum(float(m.sum()) for m in masks)
        moved = sum(float((m * (1 - m0)).sum()) for m, m0 in zip(masks, initial, strict=True)) / max(kept, 1.0)
    finally:
        for _, m in targets:  # the original weights back, untouched
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        for p, was in frozen.items():
            p.requires_grad_(was)
    log.info("hydra: %.4f of the kept weights differ from the initial (magnitude) mask", moved)
    return masks, moved


def _check_hydra(node: DictConfig, cfg: DictConfig) -> None:
    """score_epochs > 0, score_lr > 0, a known scope, and a defend objective whose loss trains
    the scores (it also fine-tunes afterwards)."""
    positive_int(cfg.prune, "score_epochs")
    positive_number(cfg.prune, "score_lr")
    check(node.get("scope", "layer") in SCOPES, "prune.scope", node.get("scope"), " or ".join(SCOPES))
    defend = cfg.get("defend")
    name = defend.get("name") if isinstance(defend, DictConfig) else None
    check(name in SCORE_OBJECTIVES and not defend.get("_target_"), "defend.name", name,
          f"{', '.join(SCORE_OBJECTIVES)} for prune=hydra: its loss trains the importance scores and then "
          f"fine-tunes the kept weights (the paper: pgd_at)")


TRAINED.add("hydra")  # applied by the compress stage (it trains first), not as a plain mask function


@register_prune("hydra", check=_check_hydra)
def _hydra_masks(targets: Targets, amount: float) -> None:
    raise RuntimeError("prune=hydra trains scores first (robustsweep.steps.hydra.train_scores, called by the "
                       "compress stage)")


def attach(targets: Targets, masks: list[torch.Tensor]) -> None:
    """The learned masks as ``torch.nn.utils.prune`` masks (kept through the fine-tune, folded in
    by the stage's finalize like every other method's)."""
    for (_, m), mask in zip(targets, masks, strict=True):
        prune.custom_from_mask(m, "weight", mask)
