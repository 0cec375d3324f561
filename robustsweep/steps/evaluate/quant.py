"""The ``quant`` evaluator: is the int8 model attacked through a faithful twin?

int8 kernels have no input gradient, so with ``quantize=int8`` white-box attacks take their gradients
through a fake-quant twin (robustsweep.steps.quantize) and the int8 model scores the examples. That
is only sound if the twin computes what the int8 model computes:

  quant_agreement   share of the evaluation images on which the twin's and the int8 model's clean
                    argmax agree; below ``quantize.min_agreement`` (0.99) the cell is tagged
                    ``suspect=quant_twin_mismatch``
  asr_twin          the ASR of the same adversarial examples on the twin itself (the images the
                    int8 model classifies correctly): beside ``asr`` (on the int8 model) it shows
                    how much is lost between the model attacked and the model deployed
  quant_grad_zero   1 if the twin gave an all-zero input gradient on the first evaluation images
                    (an attack through it would silently do nothing): the cell then fails instead
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from robustsweep.core.device import attack_batch_size
from robustsweep.core.guards import frozen
from robustsweep.steps.attacks import as_pixels, predict
from robustsweep.steps.evaluate import EvalContext, Evaluator, Outcome, register_evaluator
from robustsweep.steps.quantize import twin_mode

log = logging.getLogger(__name__)


class TwinGradientError(RuntimeError):
    """The differentiable twin of an int8 model gives no input gradient."""


def check_twin_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ``TwinGradientError`` unless the cross-entropy's input gradient through ``model``
    (in twin mode) exists, is finite and is not all zero: an attack through a graph without one
    (torchao's pt2e int8 graph, for one) would silently change nothing."""
    x = x.detach().clone().requires_grad_(True)
    try:
        with twin_mode(model), torch.enable_grad():
            F.cross_entropy(model(x), y).backward()
    except RuntimeError as e:  # "element 0 of tensors does not require grad": no graph to the input
        raise TwinGradientError(f"the model attacked gives no input gradient ({e}); a white-box attack "
                                f"through it would silently do nothing") from e
    if x.grad is None or not torch.isfinite(x.grad).all() or not bool((x.grad != 0).any()):
        raise TwinGradientError(f"the model attacked gives a missing, zero or non-finite input gradient on "
                                f"{len(x)} images; a white-box attack through it would silently do nothing")


def run(ctx: EvalContext) -> Outcome:
    ds, res = ctx.ds, ctx.results["robust"].res
    batch = attack_batch_size(ctx.cfg, ds.x_eval.device)
    with frozen(ctx.model), twin_mode(ctx.model) as has_twin:
        if not has_twin:
            raise RuntimeError("quantize=int8 but the model has no int8/twin pair")
        twin_clean = predict(ctx.model, ds.x_eval, batch)
        check_twin_gradient(ctx.model, as_pixels(ds.x_eval[:16]), ds.y_eval[:16])
    agreement = float((twin_clean == res.clean_pred).float().mean())
    correct = res.clean_pred == ds.y_eval
    n_correct = int(correct.sum())
    asr_twin = (float(((res.adv_pred_twin != ds.y_eval) & correct).sum()) / n_correct
                if res.adv_pred_twin is not None and n_correct else float("nan"))
    minimum = float(ctx.cfg.quantize.min_agreement)
    reasons = {"quant_twin_mismatch"} if agreement < minimum else set()
    log.info("int8 twin: agrees with the int8 model on %.4f of %d images (min %.2f); ASR on the twin %.4f, "
             "on the int8 model %.4f", agreement, len(twin_clean), minimum, asr_twin, res.asr)
    return Outcome({"quant_agreement": agreement, "asr_twin": asr_twin}, reasons)


register_evaluator(Evaluator(
    name="quant", group="quantize", run=run, metrics=("quant_agreement", "asr_twin"),
    reasons={"quant_twin_mismatch": "the fake-quant twin the attacks differentiate disagrees with the int8 "
                                    "model on more than 1 - quantize.min_agreement of the clean images"},
    reads=("robust",), enabled=lambda cfg: cfg.quantize.get("name") == "int8",
))
