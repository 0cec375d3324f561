"""The ``sanity`` evaluator: Carlini et al.'s checks of the attack result on every cell.

Carlini et al. 2019, "On Evaluating Adversarial Robustness", arXiv:1902.06705, section 5: on the
first ``checks.n_probe`` correctly classified evaluation images, the cell's attack at eps = 0 must
fool nothing, an unbounded attack (eps = 1) must fool ~everything, PGD must beat FGSM and random
corners of the same ball (or random directions, for L2), and an attack that claims to be
stronger than PGD (AutoAttack, APGD, an ensemble) must fool at least as many probe images as PGD-10,
give or take one image. A failure does not stop anything: it tags the cell's MLflow run
``suspect=<reasons>`` and logs a warning; the numbers are kept for a person to judge. (The guards
that *do* stop a run live in robustsweep.core.guards; the cross-cell check "ASR falls as eps
grows" in robustsweep.tracking.crosscheck.) Configured by ``checks.sanity`` / ``checks.n_probe`` /
``checks.tol``; it reads the ``robust`` evaluator's result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from robustsweep.core import cost
from robustsweep.core.guards import attack_checked, frozen
from robustsweep.core.params import check, nonnegative_int, number_in
from robustsweep.core.progress import heartbeat
from robustsweep.core.registry import is_off
from robustsweep.steps.attacks import attack_info, attack_kwargs, attack_norm, build_attack
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate import CellShape, EvalContext, Evaluator, Outcome, WorkItems, register_evaluator

log = logging.getLogger(__name__)

# Why a sanity check fails, in words a reviewer recognises (the value of the `suspect` tag lists keys).
REASONS = {
    "eps0_fools": "the attack changes predictions at eps=0: the model is stochastic or the attack "
                  "ignores eps",
    "unbounded_fails": "an unbounded attack (eps=1) fools fewer than 99 % of images: possible "
                       "gradient masking",
    "pgd_below_fgsm": "PGD is weaker than FGSM: possible gradient masking or a broken PGD",
    "pgd_below_noise": "PGD fools fewer images than random noise of the same norm: possible "
                       "gradient masking",
    "weaker_than_pgd": "an attack that should be at least as strong as PGD-10 (AutoAttack, APGD, an "
                       "ensemble) fools fewer probe images than PGD-10 by more than one image: the "
                       "attack is misconfigured or the number is not a worst case",
}
OWN_ATTACKS = ("fgsm", "pgd")  # attacks whose result on the probe images the cell already has


@dataclass
class SanityResult:
    n_probe: int = 0
    asr: dict[str, float] = field(default_factory=dict)  # eps0, noise, fgsm, pgd, unbounded, own
    reasons: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"sanity_n_probe": float(self.n_probe),
                **{f"sanity_asr_{k}": v for k, v in self.asr.items()}}


def _fooled(model: nn.Module, attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    x_adv, _ = attack_checked(attack, x, y, eps)
    with torch.inference_mode():
        return float((model(x_adv).argmax(1) != y).float().mean())


def l2_noise(eps: float, gen: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Random directions on the L2 sphere of radius eps (Gaussian, normalised), clipped to [0, 1]
    (clipping only shortens a perturbation, so it stays inside the ball)."""
    def noise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        return (x + eps * (1 - 1e-6) * d).clamp_(0, 1)
    return noise


def sign_noise(eps: float, gen: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Random corners of the L-inf ball: x + eps * (+-1), clipped to [0, 1]. The strongest
    gradient-free perturbation of that norm; an attack using gradients must do better."""
    def noise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = torch.randint(0, 2, x.shape, generator=gen).to(x.device, x.dtype) * 2 - 1
        return (x + eps * s).clamp_(0, 1)
    return noise


def sanity_probe(model: nn.Module, build: Callable[[float, dict[str, Any]], Callable[..., torch.Tensor]],
                 attack_name: str, x: torch.Tensor, y: torch.Tensor, eps: float, tol: float,
                 pgd_steps: int = 10, seed: int = 0, known: dict[str, float] | None = None,
                 memo: Callable[[str, float, dict[str, Any], Callable[[], float]], float] | None = None,
                 norm: str = "linf", own_asr: float | None = None, at_least_pgd: bool = False) -> SanityResult:
    """Carlini et al.'s checks on ``x`` (float [0, 1], all correctly classified).

    ``build(eps, overrides)`` returns an attack of the cell's kind; ``overrides`` may set
    ``name`` (fgsm/pgd) and PGD's ``steps``/``step_size``. ASRs are fractions of the probe images.
    ``known`` holds ASRs the cell's own evaluation already measured on these images (its ``fgsm``
    or ``pgd``), which are then not recomputed. ``memo(check, eps, overrides, compute)`` may
    return a value an earlier cell computed for the same model, images, check, eps and attack
    settings (robustsweep.tracking.reuse): every check is seeded on its own, so a memoised value is the
    one ``compute()`` would give. ``norm``: the cell's (``l2``: L2 noise, PGD in L2, no FGSM check).
    ``own_asr``: the cell's attack's ASR on these images, compared with PGD's when the attack declares
    itself ``at_least_pgd`` (robustsweep.steps.attacks.AttackInfo).
    """
    res = SanityResult(n_probe=len(y))
    if len(y) == 0 or attack_name == "none":
        return res
    known = known or {}

    def measure(check: str, e: float, overrides: dict[str, Any], attack: Callable[[], Any]) -> float:
        if check in known:
            return known[check]

        def compute() -> float:
            torch.manual_seed(seed)  # PGD's random start: each check seeded alone
            return _fooled(model, attack(), x, y, e)
        return memo(check, e, overrides, compute) if memo else compute()

    a = res.asr
    # At eps = 0 one PGD step exercises the same projection as ten, at a tenth of the cost. The
    # library attacks (AutoAttack: Square alone would spend 5000 queries per image on a ball of
    # radius 0) are stood in for by that PGD step: their every batch passes the ball guard anyway.
    if attack_name in OWN_ATTACKS or attack_name == "custom":
        zero = {"steps": 1} if attack_name == "pgd" else {}
    else:
        zero = {"name": "pgd", "steps": 1, "step_size": None, "random_start": True, "early_stop": True}
    a["eps0"] = measure("eps0", 0.0, zero, lambda: build(0.0, zero))
    noise = l2_noise if norm == "l2" else sign_noise
    a["noise"] = measure("noise", eps, {"norm": norm}, lambda: noise(eps, torch.Generator().manual_seed(seed)))
    # FGSM is an L-inf attack: an L2 cell has no FGSM check.
    a["fgsm"] = math.nan if norm == "l2" else measure("fgsm", eps, {"name": "fgsm"},
                                                      lambda: build(eps, {"name": "fgsm"}))
    # early_stop: these checks ask whether an adversarial example was found, and PGD that stops
    # at the first one costs a fraction of the full steps.
    pgd = {"name": "pgd"} if attack_name == "pgd" else {"name": "pgd", "steps": pgd_steps,
                                                          "step_size": None, "random_start": True,
                                                          "early_stop": True}
    a["pgd"] = measure("pgd", eps, pgd, lambda: build(eps, pgd))
    # Unbounded: every image can be turned into any other, so only masked gradients stop PGD
    # (an L-inf ball of radius 1 holds every image, whatever the cell's norm).
    unb = {"name": "pgd", "steps": max(pgd_steps, 10), "step_size": 0.1, "random_start": True,
           "early_stop": True, "norm": "linf"}
    a["unbounded"] = measure("unbounded", 1.0, unb, lambda: build(1.0, unb))
    if own_asr is not None:
        a["own"] = own_asr
        if at_least_pgd and own_asr < a["pgd"] - 1.0 / len(y) - 1e-9:
            res.reasons.append("weaker_than_pgd")
    if a["eps0"] > 0:
        res.reasons.append("eps0_fools")
    if a["unbounded"] < 0.99:
        res.reasons.append("unbounded_fails")
    if not math.isnan(a["fgsm"]) and a["pgd"] < a["fgsm"] - tol:
        res.reasons.append("pgd_below_fgsm")
    # A gradient attack must do at least as well as random corners of the same ball. (Not
    # "strictly better": at small eps both fool the same one or two fragile images.)
    if a["pgd"] < a["noise"]:
        res.reasons.append("pgd_below_noise")
    return res


def run(ctx: EvalContext) -> Outcome:
    cfg, ds, eps = ctx.cfg, ctx.ds, ctx.eps
    res = ctx.results["robust"].res
    t0 = time.perf_counter()
    idx = (res.clean_pred == ds.y_eval).nonzero().flatten()[:cfg.checks.n_probe]
    y_probe = ds.y_eval[idx]
    name = cfg.attack.get("name")
    # The cell's own attack already ran on these images: reuse its result.
    own_asr = float((res.adv_pred[idx] != y_probe).float().mean()) if len(idx) else math.nan
    own = {name: own_asr} if name in OWN_ATTACKS and not cfg.attack.get("_target_") else {}

    def memo(check: str, e: float, overrides: dict[str, Any], compute: Callable[[], float]) -> float:
        # What this check attacks with: the cell's attack settings under the overrides.
        key = ("sanity", check, e, cfg.seed, len(idx),
               attack_kwargs(cfg.attack, **overrides) if check != "noise" else overrides)
        if (v := ctx.memo.get("sanity", *key)) is None:
            ctx.memo.put("sanity", v := compute(), *key)
        return v

    # five small attacks on up to checks.n_probe images: seconds, a minute for AutoAttack's stand-ins
    with frozen(ctx.model), heartbeat(f"sanity probes ({len(idx)} images)"):
        sanity = sanity_probe(
            ctx.fast, lambda e, o: build_attack(ctx.fast, e, cfg.attack, n_classes=len(ds.classes),
                                                seed=cfg.seed, **o),
            name if not cfg.attack.get("_target_") else "custom", to_float(ds.x_eval[idx]), y_probe, eps,
            cfg.checks.tol, seed=cfg.seed, known=own, memo=memo, norm=attack_norm(cfg.attack),
            own_asr=own_asr, at_least_pgd=attack_info(cfg.attack).at_least_pgd)
    return Outcome({**sanity.metrics(), "sanity_s": time.perf_counter() - t0}, set(sanity.reasons))


def _check(cfg: DictConfig) -> None:
    check(isinstance(cfg.checks.sanity, bool), "checks.sanity", cfg.checks.sanity, "true or false")
    nonnegative_int(cfg.checks, "n_probe")
    number_in(cfg.checks, "tol", 0.0, 1.0, "a number in [0, 1]")


def _work(cfg: DictConfig, cell: CellShape) -> WorkItems:
    """On n_probe images: eps 0 (one PGD step) and unbounded PGD (10 steps, early stop) once per
    model (they do not depend on eps); noise, FGSM and PGD-10 (early stop) per cell."""
    p = min(int(cfg.checks.n_probe), cell.n_eval)
    pgd = cost.grad_range(1, 10)
    return [(("sanity", cell.model), (cost.grad_range(1) + pgd + cost.Work(fwd=2)) * p),
            (None, (cost.grad_range(1) + pgd + cost.Work(fwd=4)) * p)]


register_evaluator(Evaluator(
    name="sanity", work=_work, group="checks", run=run, reads=("robust",), reasons=REASONS, check=_check,
    metrics=("sanity_n_probe", "sanity_asr_eps0", "sanity_asr_noise", "sanity_asr_fgsm",
             "sanity_asr_pgd", "sanity_asr_unbounded", "sanity_asr_own", "sanity_s"),
    enabled=lambda cfg: bool(cfg.checks.sanity) and not is_off(cfg.attack)
    and cfg.checks.n_probe > 0,
))
