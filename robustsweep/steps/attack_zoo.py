"""The attacks a reviewer asks for, from torchattacks 3.3.0, as configs; the worst case over attacks.

* ``autoattack`` -- AutoAttack, Croce & Hein 2020, arXiv:2003.01690 (``version: standard``: APGD-CE,
  APGD-T, FAB-T, Square, each run on the images the previous ones left robust; L-inf or L2). Built
  from torchattacks' four components exactly as ``torchattacks.AutoAttack`` builds them, with the
  run's seed (torchattacks' default ``seed=None`` seeds from the clock), and run by ``Ensemble``,
  which applies the same rule as its ``MultiAttack`` and also records which component broke each
  image. ``attack=autoattack`` runs the reference's 100 iterations (APGD-T and FAB-T with 9 target
  classes: torchattacks' n_classes - 1), checked against the authors' code (pyautoattack) by
  scripts/crosscheck/crosscheck_autoattack.py; ``attack=autoattack_fast`` the 10 of torchattacks 3.3.0's own
  ``AutoAttack``, tested equal to it called on the same batches.
* ``apgd`` -- APGD, Croce & Hein 2020: step-size-free PGD with momentum (``loss``: ce or dlr).
* ``square`` -- Square Attack, Andriushchenko et al. 2020, arXiv:1912.00049: score-based black box,
  no gradients. A model that masks gradients falls to it; that is why AutoAttack includes it.
* ``cw`` -- Carlini & Wagner 2017 L2, arXiv:1608.04644. It minimises the perturbation and ignores
  eps; it returns the input unchanged where it fails. Only perturbations inside the L2 ball count:
  the others are replaced by the clean image (counted as not fooled), so ASR means the same as for
  every other attack.
* ``ensemble`` -- RobustBench's worst case per image over a list of attack configs
  (``attack.attacks``): an image is robust only if every attack fails on it.

Every attack here is seeded by the run's seed and gets the data's class count (APGD-T and FAB index
a table of ``n_classes`` targets: a wrong count is an IndexError or a silently wrong target set).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from robustsweep.core import cost
from robustsweep.core.errors import ConfigError
from robustsweep.core.params import check, key_of, number_in, positive_int
from robustsweep.steps.attacks import (
    ATTACKS,
    NORMS,
    TARGET,
    AttackFn,
    AttackInfo,
    attack_norm,
    build_attack,
    check_norm,
    pgd,
    pgd_work,
    register_attack,
)
from robustsweep.steps.data import shape_hint

log = logging.getLogger(__name__)

AA_VERSIONS = ("standard",)
AA_PREFILTERS = ("none", "pgd")  # attack.prefilter: what runs before AutoAttack's components
APGD_LOSSES = ("ce", "dlr")


# The fewest classes each loss can be computed for: APGD's DLR loss divides by the gap between the
# largest and 3rd-largest logit; APGD-T's targeted DLR (in AutoAttack) by the largest minus the mean
# of the 3rd and 4th; the targeted attacks' targets are the other classes. With fewer, torchattacks
# raises an IndexError mid-run (or, with n_classes too small, attacks a wrong target set).
MIN_CLASSES = {"autoattack": (4, "APGD-T's targeted DLR loss reads the 4th-largest logit"),
               "apgd-dlr": (3, "the DLR loss reads the 3rd-largest logit"),
               "targeted": (2, "its targets are the other classes")}


def _n_classes(n_classes: int | None, name: str, need: str = "targeted") -> int:
    least, why = MIN_CLASSES[need]
    if not n_classes or n_classes < least:
        raise ValueError(f"attack={name} needs the data's class count (>= {least}: {why}), got "
                         f"n_classes={n_classes!r}")
    return n_classes


def _check_classes(node: DictConfig, cfg: DictConfig, need: str) -> None:
    """Before any run: the data has enough classes for the attack's loss (``shape_hint`` counts an
    image folder's class folders without decoding anything)."""
    least, why = MIN_CLASSES[need]
    k = shape_hint(cfg.data)[2]
    if k < least:
        where = key_of(node, "name").removesuffix(".name")  # attack, or attack.attacks[1]
        name = node.get("name") + (f" {key_of(node, 'loss')}={node.get('loss')}" if need == "apgd-dlr" else "")
        raise ConfigError(f"{where}={name} needs a dataset with at least {least} classes ({why}); data="
                          f"{cfg.data.get('name')!r} has {k}. Allowed with {k} class(es): an untargeted "
                          f"margin-free attack, e.g. attack=pgd, attack=fgsm, attack=apgd attack.loss=ce"
                          + (", attack=square" if k >= 2 else ""))


class Ensemble:
    """Worst case over ``attacks`` per image: each attack runs on the images all earlier ones left
    unbroken (in their order), and an image's result is the first attack's that fools the model.

    ``last_broken_by``: for the images of the last call, the index of the attack that broke each
    (-1 = none did). ``names``: the attacks' names, in order."""

    def __init__(self, model: nn.Module, attacks: Sequence[tuple[str, AttackFn]], norm: str) -> None:
        self.model, self.norm = model, norm
        self.names = [n for n, _ in attacks]
        self.attacks = [a for _, a in attacks]
        self.last_broken_by = torch.empty(0, dtype=torch.long)
        self.n_grad = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.detach().clone()
        broken = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        left = torch.arange(len(x), device=x.device)
        for i, attack in enumerate(self.attacks):
            if len(left) == 0:
                break
            before, t0 = getattr(attack, "n_grad", 0), time.perf_counter()
            xa = attack(x[left], y[left]).detach()
            self.n_grad += getattr(attack, "n_grad", 0) - before
            with torch.no_grad():
                fooled = self.model(xa).argmax(1) != y[left]
            adv[left[fooled]] = xa[fooled]
            broken[left[fooled]] = i
            # a line per member: AutoAttack's four run minutes each on a CPU (issue 31: no silent minutes)
            log.info("  %s: broke %d of %d images (%d left), %.1f s", self.names[i], int(fooled.sum()),
                     len(left), int((~fooled).sum()), time.perf_counter() - t0)
            left = left[~fooled]
        self.last_broken_by = broken
        return adv


class InsideBall:
    """Keeps an eps-ignoring attack's perturbation only where it lies inside the ball (``norm``,
    pixel units); elsewhere returns the clean image, so that the image counts as not fooled."""

    def __init__(self, attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eps: float,
                 norm: str) -> None:
        self.attack, self.eps, self.norm = attack, eps, norm
        self.n_outside = 0  # perturbations found but outside the ball (work done, not counted)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = self.attack(x, y).detach()
        flat = (adv - x).flatten(1)
        dist = flat.norm(dim=1) if self.norm == "L2" else flat.abs().amax(dim=1)
        inside = dist <= self.eps
        self.n_outside += int((~inside).sum())
        return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), adv, x)


class _Named:
    """A torchattacks attack with our guard's ``norm`` attribute (theirs spell it the same)."""

    def __init__(self, attack: Callable[..., torch.Tensor], norm: str) -> None:
        self.attack, self.norm = attack, norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack(x, y)


def autoattack_components(model: nn.Module, eps: float, norm: str, n_classes: int, seed: int,
                          steps: int = 10) -> list[tuple[str, AttackFn]]:
    """APGD-CE, APGD-T, FAB-T, Square as ``torchattacks.AutoAttack(version="standard")`` builds them."""
    import torchattacks as ta

    return [
        ("apgd-ce", ta.APGD(model, eps=eps, norm=norm, seed=seed, loss="ce", n_restarts=1, steps=steps)),
        ("apgd-t", ta.APGDT(model, eps=eps, norm=norm, seed=seed, n_classes=n_classes, n_restarts=1,
                            steps=steps)),
        ("fab-t", ta.FAB(model, eps=eps, norm=norm, seed=seed, multi_targeted=True, n_classes=n_classes,
                         n_restarts=1, steps=steps)),
        ("square", ta.Square(model, eps=eps, norm=norm, seed=seed, n_queries=5000, n_restarts=1)),
    ]


def _check_autoattack(node: DictConfig, cfg: DictConfig) -> None:
    check(node.get("version", "standard") in AA_VERSIONS, key_of(node, "version"), node.get("version"),
          " or ".join(AA_VERSIONS))
    positive_int(node, "steps")
    check(node.get("prefilter", "none") in AA_PREFILTERS, key_of(node, "prefilter"), node.get("prefilter"),
          " or ".join(AA_PREFILTERS))
    if node.get("prefilter", "none") != "none":
        positive_int(node, "prefilter_steps")
    _check_classes(node, cfg, "autoattack")


# Gradient passes of one FAB iteration: the Jacobian of two logits (FAB-T's target and the label).
FAB_GRADS_PER_STEP = 2


def _autoattack_work(node: DictConfig) -> cost.Work:
    """Per attacked image: APGD-CE's ``steps`` on every image (it does not stop early), then on what
    it leaves APGD-T and FAB-T (9 target classes each) and Square's 5000 queries (forward passes);
    with the PGD prefilter, PGD first and AutoAttack only on what that leaves."""
    steps, targets = int(node.get("steps", 100)), 9
    aa = (cost.grad_range(steps).then(cost.grad_range(0, targets * steps))
          .then(cost.grad_range(0, targets * steps * FAB_GRADS_PER_STEP)).then(cost.fwd_range(0, 5000)))
    if node.get("prefilter", "none") == "none":
        return aa
    return pgd_work({"steps": node.get("prefilter_steps", 10), "early_stop": True}).then(aa)


@register_attack("autoattack", check=_check_autoattack, work=_autoattack_work,
                 info=AttackInfo(norms=("linf", "l2"), at_least_pgd=True))
def autoattack(model: nn.Module, eps: float, norm: str = "linf", version: str = "standard", steps: int = 100,
               n_classes: int | None = None, seed: int = 0, prefilter: str = "none", prefilter_steps: int = 10,
               **_: object) -> Ensemble:
    """AutoAttack standard (see the module docstring).

    ``prefilter="pgd"``: PGD (``prefilter_steps`` steps of 2.5 eps / steps from a random start, each
    image leaving at its first misclassified iterate) runs first, and AutoAttack's components only
    on the images it left robust. Robust accuracy is then the worst case over PGD and AutoAttack per
    image: never above AutoAttack's alone (an image PGD breaks is not robust), possibly below it on
    images where PGD finds an example AutoAttack misses. On an undefended model PGD breaks almost
    every image in a step or two, where APGD-CE would spend all its iterations on the whole batch."""
    n = _n_classes(n_classes, "autoattack", "autoattack")
    members = autoattack_components(model, eps, NORMS[norm], n, seed, steps)
    if prefilter == "pgd":
        members = [("pgd", pgd(model, eps, steps=prefilter_steps, early_stop=True, norm=norm)), *members]
    return Ensemble(model, members, NORMS[norm])


def _check_apgd(node: DictConfig, cfg: DictConfig) -> None:
    check(node.get("loss", "ce") in APGD_LOSSES, key_of(node, "loss"), node.get("loss"),
          " or ".join(APGD_LOSSES))
    positive_int(node, "steps")
    positive_int(node, "n_restarts")
    if node.get("loss", "ce") == "dlr":
        _check_classes(node, cfg, "apgd-dlr")


@register_attack("apgd", check=_check_apgd, info=AttackInfo(norms=("linf", "l2"), at_least_pgd=True),
                 work=lambda node: cost.grad_range(int(node.get("steps", 100))
                                                   * int(node.get("n_restarts", 1))))
def apgd(model: nn.Module, eps: float, norm: str = "linf", loss: str = "ce", steps: int = 100,
         n_restarts: int = 1, seed: int = 0, **_: object) -> AttackFn:
    """APGD (CE or DLR loss), torchattacks.APGD."""
    import torchattacks as ta

    return _Named(ta.APGD(model, eps=eps, norm=NORMS[norm], loss=loss, steps=steps, n_restarts=n_restarts,
                          seed=seed), NORMS[norm])


def _check_square(node: DictConfig, cfg: DictConfig) -> None:
    positive_int(node, "n_queries")
    positive_int(node, "n_restarts")


@register_attack("square", check=_check_square, info=AttackInfo(norms=("linf", "l2")),
                 # one query per image at the least: broken at once
                 work=lambda node: cost.fwd_range(1, int(node.get("n_queries", 5000))
                                                  * int(node.get("n_restarts", 1))))
def square(model: nn.Module, eps: float, norm: str = "linf", n_queries: int = 5000, n_restarts: int = 1,
           seed: int = 0, **_: object) -> AttackFn:
    """Square Attack (black box), torchattacks.Square with the margin loss."""
    import torchattacks as ta

    return _Named(ta.Square(model, eps=eps, norm=NORMS[norm], n_queries=n_queries, n_restarts=n_restarts,
                            seed=seed), NORMS[norm])


def _check_cw(node: DictConfig, cfg: DictConfig) -> None:
    positive_int(node, "steps")
    for key in ("c", "lr"):
        number_in(node, key, 0.0, math.inf, "a number > 0", low_open=True)
    number_in(node, "kappa", 0.0, math.inf, "a number >= 0")


@register_attack("cw", check=_check_cw, work=lambda node: cost.grad_range(int(node.get("steps", 100))),
                 info=AttackInfo(norms=("l2",)))
def cw(model: nn.Module, eps: float, norm: str = "l2", c: float = 10.0, kappa: float = 0.0, steps: int = 100,
       lr: float = 0.01, **_: object) -> InsideBall:
    """CW-L2 (torchattacks.CW), counted only inside the L2 ball (see the module docstring)."""
    import torchattacks as ta

    return InsideBall(ta.CW(model, c=c, kappa=kappa, steps=steps, lr=lr), eps, "L2")


def _members(node: DictConfig) -> list[DictConfig]:
    members = node.get("attacks")
    check(isinstance(members, ListConfig | list) and len(members) > 0, "attack.attacks", members,
          "a non-empty list of attack configs, e.g. [{name: pgd}, {name: square}]")
    return list(members)


def _check_ensemble(node: DictConfig, cfg: DictConfig) -> None:
    norm = attack_norm(node)
    for i, m in enumerate(_members(node)):
        key = f"attack.attacks[{i}]"
        check(isinstance(m, DictConfig) and (m.get("name") or m.get(TARGET)), key, m,
              "an attack config with a name (or _target_)")
        check(m.get("name") != "ensemble", f"{key}.name", "ensemble", "any attack but ensemble")
        if not m.get(TARGET):
            ATTACKS.resolve(m)
            check(attack_norm(m) == norm or "norm" not in m, f"{key}.norm", m.get("norm"),
                  f"the ensemble's norm ({norm}): every member attacks the same ball")
            if (own := ATTACKS.checks.get(m.get("name"))) is not None:
                own(m, cfg)  # the member's own checks on its node: errors name attack.attacks[i].<key>
        check_norm({**m, "norm": norm}, key)


def _ensemble_work(node: DictConfig) -> cost.Work | None:
    """Each member on what the ones before it left (None when a member declares no work)."""
    total: cost.Work | None = None
    for m in _members(node):
        w = ATTACKS.work(m)
        if w is None:
            return None
        total = w if total is None else total.then(w)
    return total


@register_attack("ensemble", check=_check_ensemble, work=_ensemble_work,
                 info=AttackInfo(norms=("linf", "l2"), at_least_pgd=True))
def ensemble(model: nn.Module, eps: float, attacks: Sequence[Any] = (), norm: str = "linf",
             n_classes: int | None = None, seed: int = 0, **_: object) -> Ensemble:
    """The worst case per image over ``attacks`` (each a config node like ``attack`` itself)."""
    built = []
    for m in attacks:
        node = dict(m)
        name = str(node.get("name") or node.get(TARGET))
        if not node.get(TARGET):
            node["norm"] = norm
        built.append((name, build_attack(model, eps, node, n_classes=n_classes, seed=seed)))
    return Ensemble(model, built, NORMS[norm])
