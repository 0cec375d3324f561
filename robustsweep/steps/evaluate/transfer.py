"""The ``transfer`` evaluator: do adversarial examples made on the dense model fool the compressed one?

Papernot et al. 2016 (arXiv:1605.07277) showed adversarial examples transfer between models; a
compressed model is the closest relative its dense baseline has. With ``transfer=dense`` the cell's
attack (same eps, norm, settings and seed) is run on the *dense* baseline, over every evaluation
image, and the examples are shown to the compressed model:

  transfer_asr          = share of the images the compressed model classifies correctly that the
                          dense model's examples flip (beside the white-box ``asr``: same images)
  transfer_robust_acc   = share of all evaluation images still correct under them
  transfer_source_asr   = the same examples' ASR on the dense model itself (white-box, its correct
                          images): the upper end a perfect transfer would reach

PGD crafts without early stop here (an early-stopped example sits just across the dense model's
boundary, which says little about another model). The examples depend only on the dense model, the
images and the attack: crafted once per process and reused by every cell (the dense memo).
"""

from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig

from robustsweep.core.cost import Work
from robustsweep.core.device import attack_batch_size
from robustsweep.core.guards import attack_checked, frozen
from robustsweep.core.params import check
from robustsweep.core.progress import progress
from robustsweep.core.registry import is_off
from robustsweep.steps.attacks import as_pixels, attack_kwargs, build_attack, predict
from robustsweep.steps.evaluate import CellShape, EvalContext, Evaluator, Outcome, WorkItems, register_evaluator

log = logging.getLogger(__name__)
SOURCES = ("none", "dense")


def craft(model: torch.nn.Module, attack: object, x_images: torch.Tensor, y: torch.Tensor, eps: float,
          batch_size: int, desc: str) -> torch.Tensor:
    """``attack`` on every image (uint8 or [0, 1]), in batches, each through the ball guard."""
    out = []
    with frozen(model):
        for i in progress(range(0, len(y), batch_size), desc=desc, unit="batch"):
            x = as_pixels(x_images[i:i + batch_size])
            out.append(attack_checked(attack, x, y[i:i + batch_size], eps)[0].detach())  # type: ignore[arg-type]
    return torch.cat(out) if out else torch.empty((0, *x_images.shape[1:]), device=x_images.device)


def run(ctx: EvalContext) -> Outcome:
    cfg, ds, eps = ctx.cfg, ctx.ds, ctx.eps
    t0 = time.perf_counter()
    res = ctx.results["robust"].res
    batch = attack_batch_size(cfg, ds.x_eval.device)
    # the whole attack, not "stop at the first adversarial iterate": what transfers is the final example
    overrides = {"early_stop": False} if "early_stop" in cfg.attack else {}
    key = ("transfer", eps, cfg.seed, attack_kwargs(cfg.attack, **overrides))
    crafted = ctx.dense_memo.get("transfer", *key)
    dense = ctx.dense()
    if crafted is None:
        torch.manual_seed(cfg.seed)
        attack = build_attack(dense, eps, cfg.attack, n_classes=len(ds.classes), seed=cfg.seed, **overrides)
        x_adv = craft(dense, attack, ds.x_eval, ds.y_eval, eps, batch,
                      desc="transfer: crafting on the dense model")
        dense_clean, dense_adv = predict(dense, ds.x_eval, batch), predict(dense, x_adv, batch)
        crafted = (x_adv, dense_clean, dense_adv)
        ctx.dense_memo.put("transfer", crafted, *key)
    x_adv, dense_clean, dense_adv = crafted
    y = ds.y_eval
    with frozen(ctx.model):
        pred = predict(ctx.fast, x_adv, batch)
    correct = res.clean_pred == y
    n_correct, dense_correct = int(correct.sum()), dense_clean == y
    metrics = {
        "transfer_asr": float(((pred != y) & correct).sum()) / n_correct if n_correct else float("nan"),
        "transfer_robust_acc": float(((pred == y) & correct).sum()) / len(y),
        "transfer_source_asr": (float(((dense_adv != y) & dense_correct).sum()) / int(dense_correct.sum())
                                if int(dense_correct.sum()) else float("nan")),
        "transfer_s": time.perf_counter() - t0,
    }
    log.info("transfer from the dense model: asr %.4f (white-box %.4f; on the dense model %.4f)",
             metrics["transfer_asr"], res.asr, metrics["transfer_source_asr"])
    return Outcome(metrics)


def _check(cfg: DictConfig) -> None:
    check(cfg.transfer.get("name") in SOURCES, "transfer.name", cfg.transfer.get("name"), " or ".join(SOURCES))


def _work(cfg: DictConfig, cell: CellShape) -> WorkItems | None:
    """The attack on the dense model once per attack and eps (the memo); its examples on this one."""
    if cell.attack_work is None:
        return None
    n = cell.n_eval
    return [(("transfer", cell.dense, cell.attack), cell.attack_work * n + Work(fwd=2 * n)),
            (None, Work(fwd=n))]


register_evaluator(Evaluator(
    name="transfer", work=_work, group="transfer", run=run, reads=("robust",), check=_check,
    metrics=("transfer_asr", "transfer_robust_acc", "transfer_source_asr", "transfer_s"),
    enabled=lambda cfg: not is_off(cfg.attack),
))
