"""Attacks (torchattacks) and the evaluation that turns them into clean/robust accuracy and ASR.

Definitions (n = evaluation images, c = images the model classifies correctly when clean):
  clean_acc  = c / n
  asr        = (correct images the attack flips) / c       -- NaN when c == 0, never 0
  robust_acc = (images correct both clean and attacked) / n = clean_acc * (1 - asr)

Only the c originally-correct images need attacking for these numbers, so only they are.
The model is in eval mode with parameters frozen throughout: BatchNorm statistics never move and
no parameter gradients are computed. Every adversarial batch is checked (``check_adversarial``):
inside the eps-ball in the attack's norm (+1e-6), in [0, 1], same shape, labels untouched; a
violation stops the run. Float inputs outside [0, 1] are refused before anything is attacked.

Adding an attack: one YAML in conf/attack/ with ``name: <yours>`` and one function here decorated
with ``@register_attack("<yours>")`` returning ``f(images, labels) -> adversarial images`` (give the
returned object a ``norm = "L2"`` attribute if it is not an L-inf attack).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torchattacks
from omegaconf import DictConfig
from torch import nn

from robustsweep.data import to_float
from robustsweep.progress import progress
from robustsweep.registry import Registry

log = logging.getLogger(__name__)

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ATTACKS: Registry[Callable[..., AttackFn]] = Registry()
register_attack = ATTACKS.register
EPS_TOL = 1e-6


@register_attack("none")
def no_attack(model: nn.Module, eps: float, **_: object) -> AttackFn:
    """The identity: robust_acc == clean_acc, asr == 0. A control cell."""
    return lambda x, y: x


@register_attack("fgsm")
def fgsm(model: nn.Module, eps: float, **_: object) -> AttackFn:
    """FGSM, Goodfellow et al. 2015, arXiv:1412.6572: one signed-gradient step of size eps."""
    return torchattacks.FGSM(model, eps=eps)


@register_attack("pgd")
def pgd(model: nn.Module, eps: float, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, **_: object) -> AttackFn:
    """L-inf PGD, Madry et al. 2018, arXiv:1706.06083.

    ``step_size=None`` uses 2.5 * eps / steps (Madry et al.'s rule), so it scales with eps.
    """
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)


def build_attack(model: nn.Module, eps: float, cfg: DictConfig | dict, **overrides: object) -> AttackFn:
    """The attack ``cfg`` describes (``overrides`` replace its keys, e.g. ``name="fgsm"``)."""
    kwargs = {**{k: v for k, v in cfg.items() if k != "batch_size"}, **overrides}
    name = kwargs.pop("name")
    if kwargs.get("step_size") is not None:
        from robustsweep.config import parse_epsilon

        kwargs["step_size"] = parse_epsilon(kwargs["step_size"])
    return ATTACKS[name](model, eps=eps, **kwargs)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


class AttackGuardError(RuntimeError):
    """An attack produced an input outside the threat model."""


def perturbation_norm(delta: torch.Tensor, norm: str) -> float:
    """Largest per-image norm of ``delta`` (N, ...): L-inf or L2, in pixel units."""
    if delta.numel() == 0:
        return 0.0
    flat = delta.flatten(1)
    if norm == "Linf":
        return flat.abs().amax().item()
    if norm == "L2":
        return flat.norm(dim=1).amax().item()
    raise AttackGuardError(f"unknown attack norm {norm!r}; allowed: Linf, L2")


def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str = "Linf",
                      y_before: torch.Tensor | None = None, y_after: torch.Tensor | None = None) -> float:
    """Raise ``AttackGuardError`` unless ``x_adv`` is a valid attack on ``x``; return its distance.

    Valid: same shape and dtype, finite, inside the eps-ball (``norm``, +1e-6), inside [0, 1], and
    the labels the attack was given unchanged (``y_before`` is a copy taken before the call)."""
    if x_adv.shape != x.shape or x_adv.dtype != x.dtype:
        raise AttackGuardError(f"attack changed the batch {tuple(x.shape)} {x.dtype} -> "
                               f"{tuple(x_adv.shape)} {x_adv.dtype}")
    if y_before is not None and y_after is not None and not torch.equal(y_before, y_after):
        raise AttackGuardError("attack modified the labels it was given")
    if not torch.isfinite(x_adv).all():
        raise AttackGuardError("adversarial batch contains NaN or inf")
    dist = perturbation_norm(x_adv - x, norm)
    if dist > eps + EPS_TOL:
        raise AttackGuardError(f"adversarial batch leaves the eps-ball: {norm} {dist:.6g} > eps {eps:.6g}")
    lo, hi = (x_adv.min().item(), x_adv.max().item()) if x_adv.numel() else (0.0, 1.0)
    if lo < 0.0 or hi > 1.0:
        raise AttackGuardError(f"adversarial batch leaves [0, 1]: range [{lo:.4g}, {hi:.4g}]")
    return dist


def attack_checked(attack: AttackFn, x: torch.Tensor, y: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, float]:
    """``attack(x, y)`` put through ``check_adversarial`` (in the attack's norm, with the labels
    compared to a copy taken before the call); the adversarial batch and its distance."""
    y_before = y.clone()
    x_adv = attack(x, y)
    return x_adv, check_adversarial(x, x_adv, eps, getattr(attack, "norm", "Linf"), y_before, y)


@torch.inference_mode()
def predict(model: nn.Module, x_images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class predictions for uint8 (or float [0, 1]) images, in batches."""
    return torch.cat([model(as_pixels(x_images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(x_images), batch_size)]) if len(x_images) else \
        torch.empty(0, dtype=torch.long, device=x_images.device)


@dataclass
class EvalResult:
    n_eval: int
    n_correct: int
    n_fooled: int
    clean_pred: torch.Tensor  # (n_eval,)
    adv_pred: torch.Tensor  # (n_eval,): = clean_pred where not attacked (clean-wrong images)
    n_batches_checked: int = 0  # adversarial batches that passed check_adversarial
    max_dist: float = 0.0  # largest perturbation norm seen (<= eps + 1e-6 by the guard)

    @property
    def clean_acc(self) -> float:
        return self.n_correct / self.n_eval

    @property
    def robust_acc(self) -> float:
        return (self.n_correct - self.n_fooled) / self.n_eval

    @property
    def asr(self) -> float:
        return self.n_fooled / self.n_correct if self.n_correct else float("nan")


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float [0, 1]; float images are checked to be in [0, 1] already."""
    from robustsweep.checks import check_unit_range

    if x.dtype == torch.uint8:
        return to_float(x)
    check_unit_range(x, "evaluation images")
    return x.float()


def evaluate(model: nn.Module, attack: AttackFn, x_images: torch.Tensor, y: torch.Tensor,
             eps: float, batch_size: int, desc: str = "attack") -> EvalResult:
    """Clean predictions, then attack the correctly classified images batch by batch.

    ``x_images``: uint8 (0..255) or float in [0, 1]; anything else is refused by ``predict``,
    before any image is attacked."""
    with frozen(model):
        clean_pred = predict(model, x_images, batch_size)
        correct_idx = (clean_pred == y).nonzero().flatten()
        adv_pred = clean_pred.clone()
        n_fooled, n_batches, max_dist = 0, 0, 0.0
        for i in progress(range(0, len(correct_idx), batch_size), desc=desc, unit="batch"):
            idx = correct_idx[i:i + batch_size]
            x, yb = as_pixels(x_images[idx]), y[idx]
            x_adv, dist = attack_checked(attack, x, yb, eps)  # labels verified unchanged
            max_dist = max(max_dist, dist)
            n_batches += 1
            with torch.inference_mode():
                p = model(x_adv).argmax(1)
            adv_pred[idx] = p
            n_fooled += int((p != yb).sum())
    res = EvalResult(n_eval=len(y), n_correct=len(correct_idx), n_fooled=n_fooled,
                     clean_pred=clean_pred, adv_pred=adv_pred, n_batches_checked=n_batches,
                     max_dist=max_dist)
    if res.n_correct == 0:
        log.warning("the model classifies none of the %d evaluation images correctly: asr is NaN",
                    res.n_eval)
    return res
