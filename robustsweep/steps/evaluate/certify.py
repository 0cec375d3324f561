"""The ``certify`` evaluator: certified robust accuracy, a lower bound beside the attack's upper bound.

``certify=ibp`` / ``certify=crown`` bound the L-inf ball of the cell's epsilon (below);
``certify=smoothing`` certifies the randomized-smoothing classifier of the model in L2
(robustsweep.steps.smoothing): ``certified_acc`` at ``certify.radius`` (images predicted correctly
by the smoothed classifier with a certified radius >= it), ``certified_acc_at_<r>`` for each of
``certify.radii``, ``certified_radius_mean`` (average certified radius, 0 for wrong or abstained
images), ``abstain_rate`` and ``smoothed_acc`` (correct, radius >= 0). Its certificate holds with
probability 1 - ``certify.alpha`` per image and is about the smoothed classifier g, not the model the
cell's attack ran on, so it is not checked against that attack. Its own empirical bound:
``smoothed_robust_acc``, the share PREDICT classifies correctly after SmoothAdv PGD (Salman et al.
2019) within L2 radius ``certify.radius`` (``certify.attack_steps`` steps of ``certify.attack_samples``
noise draws; 0 steps = not run). An image certified at that radius and then PREDICTed as another class
is a violation; each has probability <= 2 * alpha (CERTIFY's and PREDICT's failure), so
``smoothing_violations`` is logged and more than chance allows (p < 1e-6) raises
``CertificateViolationError``.

An attack that fails proves nothing; a certificate does. For each evaluation image the bound
(robustsweep.steps.bounds: ``certify=ibp`` or ``certify=crown``) gives a lower bound on
logit_y - logit_j for every j != y over the whole L-inf ball of the cell's epsilon (intersected
with [0, 1], through the normalising wrapper); the image is certified when every bound is > 0.

  certified_acc      share of the evaluation images certified (<= robust_acc, always)
  n_certified        their number
  certified_gap      robust_acc - certified_acc: how much of the attack's number is unproven
  certify_s          seconds spent bounding

**Invariant, checked on every cell**: a certified image must be classified correctly, clean and
under the cell's attack (same images, same eps). A violation is a bug in the bound or in the
attack: the run fails with ``CertificateViolationError`` naming the images, never a logged number.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from robustsweep.core.errors import ConfigError
from robustsweep.core.guards import frozen
from robustsweep.core.params import check, nonnegative_int, number_in, positive_int
from robustsweep.core.progress import heartbeat, progress
from robustsweep.core.registry import Registry
from robustsweep.steps.attacks import as_pixels, attack_norm
from robustsweep.steps.bounds import (
    BoundError,
    crown_margins,
    crown_memory_bytes,
    flatten,
    has_residual,
    ibp_margins,
    network_for_checks,
)
from robustsweep.steps.evaluate import EvalContext, Evaluator, Outcome, register_evaluator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertificateInfo:
    """What a certificate declares where it is registered."""

    norm: str  # the ball it certifies: "linf" (the cell's epsilon) or "l2" (certify.radius)
    guarantee: str  # what "certified" promises, in words
    of_the_model: bool = True  # about the attacked model (checked against the attack) or another one


DETERMINISTIC = "deterministic: every input in the ball is classified correctly"
# certify.name -> run(ctx) -> Outcome; each registered with its key checks and CertificateInfo
CERTIFICATES: Registry[Callable[[EvalContext], Outcome]] = Registry("certify")


class CertificateViolationError(RuntimeError):
    """An image certified robust was misclassified (clean or attacked): the bound or the attack is wrong."""


def check_certify(cfg: DictConfig) -> None:
    """``certify.*``: the chosen certificate's own checks (``none``: off)."""
    node = cfg.certify
    if node.get("name", "none") == "none" and not node.get("_target_"):
        return
    CERTIFICATES.validate(node, cfg)


def _check_bounds(cfg: DictConfig) -> list:
    """What IBP and CROWN both need: an L-inf cell, a float model, layers the bounds handle."""
    name = cfg.certify.name
    check(attack_norm(cfg.attack) == "linf", "certify", name,
          f"an L-inf attack: {name} bounds the L-inf ball of the cell's epsilon, and the cell's "
          f"attack.norm={attack_norm(cfg.attack)!r} (certified vs empirical would compare different balls)")
    q = cfg.get("quantize")
    check(q is None or q.get("name", "none") != "int8", "certify", name,
          "a float model: quantize=int8 runs int8 kernels the bounds do not model (quantize=fake is fine)")
    net, _, _ = network_for_checks(cfg)
    try:
        return flatten(net)
    except BoundError as e:
        raise ConfigError(f"certify={name}: model={cfg.model.get('name') or cfg.model.get('_target_')} has a "
                          f"layer the bounds cannot handle: {e}") from None


def _check_ibp(node: DictConfig, cfg: DictConfig) -> None:
    positive_int(cfg.certify, "batch_size")
    _check_bounds(cfg)


def _check_crown(node: DictConfig, cfg: DictConfig) -> None:
    check(node.get("intermediate") in ("crown", "ibp"), "certify.intermediate", node.get("intermediate"),
          "crown (plain stacks) or ibp (CROWN-IBP, residual networks too)")
    positive_int(cfg.certify, "chunk")
    number_in(cfg.certify, "max_memory_mb", 0.0, math.inf, "a number of MB > 0", low_open=True)
    nodes = _check_bounds(cfg)
    if node.intermediate == "crown":
        net, shape, classes = network_for_checks(cfg)
        check(not has_residual(nodes), "certify.intermediate", "crown",
              "ibp for a network with residual blocks (CROWN-IBP: intermediate bounds by IBP, the last "
              "layer by CROWN); full CROWN here bounds plain stacks")
        need = crown_memory_bytes(net, shape, 1, int(node.chunk), classes) / 2**20
        check(need <= node.max_memory_mb, "certify.max_memory_mb", node.max_memory_mb,
              f">= {need:.0f} MB: full CROWN needs that for one image at certify.chunk={node.chunk}; "
              f"lower certify.chunk, or use certify.intermediate=ibp or certify=ibp")


def _check_smoothing(node: DictConfig, cfg: DictConfig) -> None:
    number_in(cfg.certify, "sigma", 0.0, math.inf, "a noise level > 0 in pixel units (L2), e.g. 0.25",
              low_open=True, high_open=True)
    positive_int(cfg, "certify.n0")
    positive_int(cfg.certify, "n")
    check(node.n0 < node.n, "certify.n0", node.n0,
          f"fewer samples than certify.n={node.n} (n0 only guesses the class; n estimates its probability)")
    number_in(cfg.certify, "alpha", 0.0, 1.0, "a failure probability in (0, 1), e.g. 0.001", low_open=True,
              high_open=True)
    number_in(cfg.certify, "radius", 0.0, math.inf, "an L2 radius >= 0 in pixel units, e.g. 0.25")
    nonnegative_int(cfg.certify, "attack_steps")
    positive_int(cfg.certify, "attack_samples")
    radii = node.get("radii") or []
    ok = all(isinstance(r, int | float) and not isinstance(r, bool) and r >= 0 for r in radii)
    check(ok, "certify.radii", list(radii), "a list of L2 radii >= 0")
    positive_int(cfg.certify, "batch_size")


@CERTIFICATES.register("smoothing", check=_check_smoothing, info=CertificateInfo(
    "l2", "probabilistic: the smoothed classifier g (not the attacked model) is correct in the L2 ball of "
          "certify.radius, with probability >= 1 - certify.alpha per image", of_the_model=False))
def smoothing(ctx: EvalContext) -> Outcome:
    from robustsweep.steps.smoothing import ABSTAIN, certify

    node, ds = ctx.cfg.certify, ctx.ds
    sigma, n_classes, batch = float(node.sigma), len(ds.classes), int(node.batch_size)
    gen = torch.Generator(device=ds.x_eval.device).manual_seed(int(ctx.cfg.seed))
    t0 = time.perf_counter()
    preds, radii = [], []
    with frozen(ctx.model):
        x_all = as_pixels(ds.x_eval)
        desc = f"smoothing sigma={node.sigma} n={node.n}"
        for i in progress(range(len(x_all)), desc=desc, unit="img"):
            with heartbeat(f"{desc}: image {i + 1} of {len(x_all)}"):
                c = certify(ctx.model, x_all[i], sigma, int(node.n0), int(node.n), float(node.alpha),
                            n_classes, batch, gen)
            preds.append(c.pred)
            radii.append(c.radius)
    seconds = time.perf_counter() - t0
    pred = torch.tensor(preds)
    radius = torch.tensor(radii)
    y = ds.y_eval.cpu()
    correct = pred == y
    n = len(pred)
    metrics = {"certified_acc": float((correct & (radius >= node.radius)).sum()) / n,
               "certified_radius_mean": float(torch.where(correct, radius, torch.zeros_like(radius)).mean()),
               "abstain_rate": float((pred == ABSTAIN).sum()) / n, "smoothed_acc": float(correct.sum()) / n,
               "certify_s": seconds}
    for r in node.get("radii") or []:
        metrics[f"certified_acc_at_{float(r):.2f}"] = float((correct & (radius >= r)).sum()) / n
    log.info("certify=smoothing sigma %g: certified_acc %.4f at r=%g, ACR %.4f, abstain %.4f, smoothed acc "
             "%.4f, %.1f s for %d images", node.sigma, metrics["certified_acc"], node.radius,
             metrics["certified_radius_mean"], metrics["abstain_rate"], metrics["smoothed_acc"], seconds, n)
    if int(node.attack_steps) > 0:
        metrics.update(_attack_smoothed(ctx, x_all, correct & (radius >= node.radius), gen))
    return Outcome(metrics)


def _attack_smoothed(ctx: EvalContext, x_all: torch.Tensor, certified: torch.Tensor,
                     gen: torch.Generator) -> dict[str, float]:
    """SmoothAdv within certify.radius, then PREDICT: the smoothed classifier's empirical robust accuracy,
    and the check that no image certified at that radius is PREDICTed as another class beyond chance."""
    from scipy.stats import binom

    from robustsweep.steps.smoothing import ABSTAIN, predict, smooth_adv

    node, ds = ctx.cfg.certify, ctx.ds
    sigma, samples, n_classes = float(node.sigma), int(node.attack_samples), len(ds.classes)
    per = max(1, int(node.batch_size) // samples)  # images per SmoothAdv batch: batch_size noisy copies
    t0 = time.perf_counter()
    adv_pred = []
    with frozen(ctx.model):
        desc = f"SmoothAdv r={node.radius}"
        for i in progress(range(0, len(x_all), per), desc=desc, unit="batch"):
            with heartbeat(f"{desc}: images {i + 1}-{min(i + per, len(x_all))} of {len(x_all)}"):
                x_adv = smooth_adv(ctx.model, x_all[i:i + per], ds.y_eval[i:i + per], sigma,
                                   float(node.radius), int(node.attack_steps), samples, gen)
                adv_pred += [predict(ctx.model, xa, sigma, int(node.n), float(node.alpha), n_classes,
                                     int(node.batch_size), gen) for xa in x_adv]
    adv_pred_t = torch.tensor(adv_pred)
    y = ds.y_eval.cpu()
    violated = certified & (adv_pred_t != y) & (adv_pred_t != ABSTAIN)
    n_cert, n_bad = int(certified.sum()), int(violated.sum())
    # For each image, P(certified at r and PREDICTed as another class within r) <= alpha (CERTIFY wrong)
    # + alpha (PREDICT wrong), unconditionally: over all the images, more than the binomial's 1 - 1e-6
    # quantile of that is not chance but a bug in the certificate or the sampler. (Not conditioned on
    # being certified: the certified images are selected by the same sampling.)
    allowed = int(binom.ppf(1 - 1e-6, len(y), min(1.0, 2 * float(node.alpha))))
    if n_bad > allowed:
        idx = ds.eval_idx.cpu()[violated.nonzero().flatten()].tolist()
        raise CertificateViolationError(
            f"certify=smoothing: {n_bad} of {n_cert} image(s) certified at L2 radius {node.radius} are "
            f"classified as another class by the smoothed classifier after SmoothAdv within that radius "
            f"(chance allows <= {allowed} at alpha={node.alpha}; test-split indices {idx[:10]}): no metrics "
            f"logged")
    out = {"smoothed_robust_acc": float((adv_pred_t == y).sum()) / len(y),
           "smoothing_violations": float(n_bad), "smooth_adv_s": time.perf_counter() - t0}
    log.info("SmoothAdv (L2 %g, %d steps x %d draws) + PREDICT: smoothed robust acc %.4f (certified %.4f at "
             "that radius), %d violation(s), %.1f s", node.radius, node.attack_steps, samples,
             out["smoothed_robust_acc"], n_cert / len(y), n_bad, out["smooth_adv_s"])
    return out


Margins = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> (B, K-1) lower bounds


@CERTIFICATES.register("ibp", check=_check_ibp, info=CertificateInfo("linf", DETERMINISTIC))
def ibp(ctx: EvalContext) -> Outcome:
    """Interval bound propagation (robustsweep.steps.bounds.ibp_margins), certify.batch_size images at once."""
    n_classes = len(ctx.ds.classes)

    def margins(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ibp_margins(ctx.model, x, y, ctx.eps, n_classes)

    return _certify_by_bounds(ctx, margins, int(ctx.cfg.certify.batch_size))


@CERTIFICATES.register("crown", check=_check_crown, info=CertificateInfo("linf", DETERMINISTIC))
def crown(ctx: EvalContext) -> Outcome:
    """CROWN or CROWN-IBP (certify.intermediate), as many images at once as certify.max_memory_mb holds."""
    node, n_classes = ctx.cfg.certify, len(ctx.ds.classes)
    if node.intermediate == "ibp":
        batch = 64
    else:
        per_image = crown_memory_bytes(ctx.model, tuple(ctx.ds.x_eval.shape[1:]), 1, int(node.chunk), n_classes)
        batch = max(1, min(256, int(node.max_memory_mb * 2**20 // per_image)))
    method = "crown" if node.intermediate == "crown" else "crown-ibp"

    def margins(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return crown_margins(ctx.model, x, y, ctx.eps, n_classes, method=method, chunk=int(node.chunk))

    return _certify_by_bounds(ctx, margins, batch)


def _certify_by_bounds(ctx: EvalContext, margins: Margins, batch: int) -> Outcome:
    """Certified where every margin bound is > 0; checked against the cell's attack (the invariant)."""
    node, ds, eps = ctx.cfg.certify, ctx.ds, ctx.eps
    res = ctx.results["robust"].res
    t0 = time.perf_counter()
    certified = torch.zeros(len(ds.y_eval), dtype=torch.bool)
    with frozen(ctx.model):
        desc = f"certify={node.name} eps={eps:.4g}"
        n_total = -(-len(ds.y_eval) // batch)
        for i in progress(range(0, len(ds.y_eval), batch), desc=desc, unit="batch"):
            x = as_pixels(ds.x_eval[i:i + batch])
            y = ds.y_eval[i:i + batch]
            with heartbeat(f"{desc}: batch {i // batch + 1} of {n_total} ({len(y)} images)"):
                m = margins(x, y)
            certified[i:i + batch] = (m > 0).all(1).cpu()
    seconds = time.perf_counter() - t0
    y = ds.y_eval.cpu()
    robust_ok = (res.clean_pred.cpu() == y) & (res.adv_pred.cpu() == y)
    bad = (certified & ~robust_ok).nonzero().flatten()
    if len(bad):
        idx = ds.eval_idx.cpu()[bad].tolist()
        raise CertificateViolationError(
            f"certify={node.name}: {len(bad)} image(s) certified robust at eps={eps:.6g} are misclassified "
            f"clean or under attack={ctx.cfg.attack.get('name')} (test-split indices {idx[:10]}): the bound or "
            f"the attack is wrong; no metrics logged")
    n_cert = int(certified.sum())
    metrics = {"certified_acc": n_cert / len(y), "n_certified": float(n_cert),
               "certified_gap": res.robust_acc - n_cert / len(y), "certify_s": seconds}
    log.info("certify=%s: certified_acc %.4f (robust_acc %.4f by %s), %.1f s for %d images", node.name,
             metrics["certified_acc"], res.robust_acc, ctx.cfg.attack.get("name"), seconds, len(y))
    return Outcome(metrics)




@CERTIFICATES.register("none", info=CertificateInfo("linf", "nothing: no certificate (the default)"))
def no_certificate(ctx: EvalContext) -> Outcome:
    return Outcome({})


def run(ctx: EvalContext) -> Outcome:
    """The chosen certificate (``certify.name``, or a ``certify._target_`` callable of the same shape)."""
    info = CERTIFICATES.info(ctx.cfg.certify)
    if info is not None:
        log.info("certify=%s (%s ball) guarantees: %s", ctx.cfg.certify.name, info.norm, info.guarantee)
    return CERTIFICATES.resolve(ctx.cfg.certify)(ctx)


register_evaluator(Evaluator(
    name="certify", group="certify", run=run, check=check_certify, reads=("robust",),
    metrics=("certified_acc", "n_certified", "certified_gap", "certified_radius_mean", "abstain_rate",
             "smoothed_acc", "certify_s", "smoothed_robust_acc", "smoothing_violations", "smooth_adv_s"),
    metric_prefixes=("certified_acc_at_",),
))
