"""Attacks and the evaluation that turns them into clean/robust accuracy and ASR.

Definitions (n = evaluation images, c = images the model classifies correctly when clean):
  clean_acc  = c / n
  asr        = (correct images the attack flips) / c       -- NaN when c == 0, never 0
  robust_acc = (images correct both clean and attacked) / n = clean_acc * (1 - asr)

Only the c originally-correct images need attacking for these numbers, so only they are.
The model is in eval mode with parameters frozen throughout: BatchNorm statistics never move and
no parameter gradients are computed. Every adversarial batch is checked
(``robustsweep.core.guards.check_adversarial``): inside the eps-ball in the attack's norm (+1e-6),
in [0, 1], same shape, labels untouched; a violation stops the run. Float inputs outside [0, 1]
are refused before anything is attacked.

FGSM and PGD are written here rather than taken from torchattacks because a sweep needs two
things it lacks: FGSM's direction reused across eps, and PGD that stops attacking an image once it
is fooled. Without those options both compute exactly what torchattacks does (tested bit for bit).

Threat model: ``attack.norm`` (``linf`` default, ``l2``); eps is in that norm's pixel units (L2:
the norm of the perturbation over the whole image, e.g. 0.5 on CIFAR-10). Each registered attack
declares the norms it supports; FGSM is L-inf only. The stronger attacks (AutoAttack, APGD,
Square, CW) and the per-image worst case over attacks live in robustsweep.steps.attack_zoo,
which ATTACKS imports on its first lookup.

Adding an attack: one YAML in conf/attack/ with ``_target_: <pkg.module.callable>`` (called as
``callable(model, eps=eps, **the YAML's other keys)``, e.g. ``torchattacks.MIFGSM``), or
``name: <yours>`` and one function here decorated with ``@register_attack("<yours>")``; either
returns ``f(images, labels) -> adversarial images`` (give it a ``norm = "L2"`` attribute if it is
not an L-inf attack: the guard checks the ball in that norm).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.core import cost
from robustsweep.core.guards import attack_checked, check_unit_range, frozen
from robustsweep.core.params import check, key_of, parse_epsilon, positive_int
from robustsweep.core.progress import heartbeat, progress
from robustsweep.core.registry import TARGET, Registry
from robustsweep.steps.data import to_float
from robustsweep.steps.quantize import pairs, twin_mode

log = logging.getLogger(__name__)

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = {"linf": "Linf", "l2": "L2"}  # attack.norm -> the guard's and torchattacks' spelling
# attack.name -> f(model, eps, **attack keys) -> attack; or attack._target_: any callable of that
# shape, e.g. torchattacks.MIFGSM (conf/attack/mifgsm.yaml: a torchattacks attack by YAML alone).
# robustsweep.steps.attack_zoo (AutoAttack, APGD, Square, CW, ensembles) registers itself on first lookup.
ATTACKS: Registry[Callable[..., AttackFn]] = Registry("attack", plugins=("robustsweep.steps.attack_zoo",))


@dataclass(frozen=True)
class AttackInfo:
    """What an attack declares about itself where it is registered (``register_attack(info=...)``)."""

    norms: tuple[str, ...] = ("linf",)  # the attack.norm values it supports
    # meant to be at least as strong as PGD: the sanity check flags a cell where it breaks fewer
    # images than a PGD run of the same budget (``pgd_stronger``)
    at_least_pgd: bool = False


AttackBuilder = Callable[..., AttackFn]


def register_attack(name: str, check: Callable[[DictConfig, DictConfig], None] | None = None,
                    work: Callable[[DictConfig], Any] | None = None,
                    info: AttackInfo | None = None) -> Callable[[AttackBuilder], AttackBuilder]:
    """``@register_attack("name", check=, work=, info=)``: an attack, its key checks, its work
    (robustsweep.core.cost) and what it is (``AttackInfo``: L-inf only and no stronger than PGD unless
    it says so)."""
    return ATTACKS.register(name, check=check, work=work, info=info or AttackInfo())


def attack_info(node: DictConfig | dict) -> AttackInfo:
    """The chosen attack's declaration; a ``_target_`` attack may use any norm (its own business)."""
    return ATTACKS.info(node, AttackInfo(norms=tuple(NORMS)))
# Keys the evaluator supplies to registered attacks (not from YAML): the data's class count (APGD-T
# and FAB index a class table of that size) and the run's seed.
CONTEXT_KEYS = ("n_classes", "seed")


def attack_norm(node: DictConfig | dict) -> str:
    """``attack.norm``: ``linf`` (the default when a YAML has no such key) or ``l2``."""
    return str(node.get("norm") or "linf")
STEP_KEYS = ("step_size", "alpha")  # step sizes may be written as fractions ("2/255")


@register_attack("none", work=lambda node: cost.NONE, info=AttackInfo(norms=("linf", "l2")))
def no_attack(model: nn.Module, eps: float, **_: object) -> AttackFn:
    """The identity: robust_acc == clean_acc, asr == 0. A control cell."""
    return lambda x, y: x


class FGSM:
    """FGSM, Goodfellow et al. 2015, arXiv:1412.6572: one signed-gradient step of size eps,
    x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1).

    ``torchattacks.FGSM``'s computation (tests compare the two bit for bit), split in two because
    the sign does not depend on eps: ``direction(x, y)`` is one forward + input-gradient per image,
    and ``step(x, direction)`` is free. A sweep computes the direction once per model and images
    and reuses it for every eps (``evaluate(..., direction=...)``; pipeline.py caches it).
    """

    norm = "Linf"

    def __init__(self, model: nn.Module, eps: float) -> None:
        self.model, self.eps = model, eps
        self.n_grad = 0  # images that went through forward + input-gradient (work done)

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sign(grad_x loss) as int8 in {-1, 0, 1}: 1 byte per pixel, a quarter of float32."""
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(self.model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        self.n_grad += len(x)
        return grad.sign().to(torch.int8)

    def step(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x.detach() + self.eps * direction.to(x.dtype), min=0, max=1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.step(x, self.direction(x, y))


class PGD:
    """PGD, Madry et al. 2018, arXiv:1706.06083: from a random start in the ball, ``steps``
    gradient steps of size ``alpha``, each projected onto the ball and [0, 1].

    L-inf (``norm="Linf"``): signed-gradient steps, uniform random start; with ``early_stop=False``
    this is ``torchattacks.PGD``'s computation. L2 (``norm="L2"``): steps along the L2-normalised
    gradient, radial projection, a random start of uniform radius in a random direction; with
    ``early_stop=False`` this is ``torchattacks.PGDL2``'s computation. (Tests compare both bit for
    bit, random start included.)

    With ``early_stop=True`` an image leaves the batch at the first iterate the model
    misclassifies, and that iterate is its result: the attack has found an adversarial example
    inside the ball, which is what ASR counts. ASR is then "fooled at some iterate" (>= the
    last-iterate ASR, equal to "fooled at any iterate" of the full attack: tested), and on an
    undefended model most images leave after one or two steps.

    ``eps`` and ``alpha`` may be tensors of one value per image (the minimum-norm search attacks
    each image at its own radius).
    """

    def __init__(self, model: nn.Module, eps: float | torch.Tensor, alpha: float | torch.Tensor, steps: int,
                 random_start: bool = True, early_stop: bool = False, norm: str = "Linf") -> None:
        if norm not in NORMS.values():
            raise ValueError(f"norm={norm!r}; allowed: {', '.join(NORMS.values())}")
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps
        self.random_start, self.early_stop, self.norm = random_start, early_stop, norm
        self.n_grad = 0  # images that went through forward + input-gradient (work done)

    @staticmethod
    def _per_image(v: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
        """A scalar stays a scalar (bit-identical arithmetic); a per-image tensor -> (N, 1, 1, 1)."""
        return v.to(x.device, x.dtype).reshape(-1, *[1] * (x.dim() - 1)) if torch.is_tensor(v) else v

    def _start(self, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            if torch.is_tensor(eps):
                noise = (torch.rand_like(x) * 2 - 1) * eps
            else:
                noise = torch.empty_like(x).uniform_(-eps, eps)
            return torch.clamp(x + noise, min=0, max=1)
        delta = torch.empty_like(x).normal_()
        n = delta.reshape(len(x), -1).norm(p=2, dim=1).view(len(x), *[1] * (x.dim() - 1))
        r = torch.zeros_like(n).uniform_(0, 1)
        delta *= r / n * eps
        return torch.clamp(x + delta, min=0, max=1)

    def _step(self, xa: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, eps: float | torch.Tensor,
              alpha: float | torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            step = xa + alpha * grad.sign()
            if torch.is_tensor(eps):
                return torch.clamp(x0 + torch.max(torch.min(step - x0, eps), -eps), min=0, max=1)
            return torch.clamp(x0 + torch.clamp(step - x0, min=-eps, max=eps), min=0, max=1)
        shape = (len(xa), *[1] * (xa.dim() - 1))
        gnorm = grad.reshape(len(xa), -1).norm(p=2, dim=1) + 1e-10  # torchattacks' eps_for_division
        new = xa + alpha * (grad / gnorm.view(shape))
        delta = new - x0
        dnorm = delta.reshape(len(xa), -1).norm(p=2, dim=1)
        factor = (eps.flatten() if torch.is_tensor(eps) else eps) / dnorm
        # A zero perturbation needs no projection (torchattacks divides 0 by 0 here: NaN at eps = 0)
        factor = torch.where(dnorm > 0, torch.min(factor, torch.ones_like(dnorm)), torch.ones_like(dnorm))
        return torch.clamp(x0 + delta * factor.view(shape), min=0, max=1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        eps, alpha = self._per_image(self.eps, x), self._per_image(self.alpha, x)
        adv = x.clone()
        if self.random_start:
            adv = self._start(adv, eps)
        active = None  # indices still attacked; None = all (the early_stop=False path, no copies)
        for _ in range(self.steps):
            xa = (adv if active is None else adv[active]).requires_grad_(True)
            ya = y if active is None else y[active]
            logits = self.model(xa)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, ya), xa)
            self.n_grad += len(xa)
            xa = xa.detach()
            if self.early_stop:
                going = logits.detach().argmax(1) == ya  # not yet fooled: keep attacking
                active = (torch.arange(len(x), device=x.device) if active is None else active)[going]
                xa, grad = xa[going], grad[going]
                if len(active) == 0:
                    break
            x0 = x if active is None else x[active]
            e, a = ((eps, alpha) if active is None else
                    tuple(v[active] if torch.is_tensor(v) else v for v in (eps, alpha)))
            new = self._step(xa, grad, x0, e, a)
            if active is None:
                adv = new
            else:
                adv = adv.detach()
                adv[active] = new
        return adv.detach()


@register_attack("fgsm", work=lambda node: cost.grad_range(1))
def fgsm(model: nn.Module, eps: float, **_: object) -> FGSM:
    """FGSM (see ``FGSM``)."""
    return FGSM(model, eps)


def _check_pgd(node: DictConfig, cfg: DictConfig) -> None:
    positive_int(node, "steps")
    check(isinstance(node.get("early_stop", False), bool), key_of(node, "early_stop"), node.get("early_stop"),
          "true or false")
    step = node.get("step_size")
    if step is not None:
        allowed = "null (= 2.5*eps/steps, Madry et al.) or a step in (0, 1], e.g. 2/255"
        try:
            value = parse_epsilon(step, attack_norm(node))
        except ValueError:
            value = -1.0
        check(value > 0, key_of(node, "step_size"), step, allowed)
        # A step larger than the ball is clipped back every step: PGD degenerates into
        # projected sign noise. Almost always a mix-up of eps and step (2/255 vs 8/255).
        eps = parse_epsilon(cfg.epsilon, attack_norm(node))
        check(value <= eps or eps == 0, key_of(node, "step_size"), step,
              f"a step <= epsilon ({eps:.6g}); or null to scale with epsilon (2.5*eps/steps)")


def pgd_work(node: DictConfig) -> cost.Work:
    """Per attacked image: ``steps`` gradient passes; with ``early_stop``, 1 for an image broken at
    once."""
    steps = int(node.get("steps", 10))
    return cost.grad_range(1 if node.get("early_stop", False) else steps, steps)


@register_attack("pgd", check=_check_pgd, work=pgd_work, info=AttackInfo(norms=("linf", "l2")))
def pgd(model: nn.Module, eps: float, steps: int = 10, step_size: float | None = None,
        random_start: bool = True, early_stop: bool = False, norm: str = "linf", **_: object) -> PGD:
    """PGD in L-inf or L2 (see ``PGD``).

    ``step_size=None`` uses 2.5 * eps / steps (Madry et al.'s rule), so it scales with eps.
    """
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    return PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
               early_stop=early_stop, norm=NORMS[norm])


def check_norm(node: DictConfig | dict, key: str = "attack") -> str:
    """``<key>.norm`` is one the attack supports (a ``_target_`` attack: any of NORMS)."""
    norm = attack_norm(node)
    check(norm in NORMS, f"{key}.norm", node.get("norm"), " or ".join(NORMS))
    name = node.get("name")
    if not node.get(TARGET) and name in ATTACKS:
        supported = attack_info(node).norms
        check(norm in supported, f"{key}.norm", norm,
              f"{' or '.join(supported)} ({key}={name} supports no other norm)")
    return norm


def check_attack_config(node: DictConfig, cfg: DictConfig) -> None:
    """``attack.*``: the chosen attack's own checks, its norm, and ``attack.batch_size``."""
    ATTACKS.validate(node, cfg)
    check_norm(node)
    bs = node.get("batch_size", "auto")
    if bs != "auto":
        check(isinstance(bs, int) and not isinstance(bs, bool) and bs > 0, "attack.batch_size", bs,
              "auto (128 on CPU, 1024 on CUDA) or an integer > 0")


def attack_kwargs(cfg: DictConfig | dict, **overrides: object) -> dict[str, object]:
    """What an attack is built from: ``cfg``'s keys (``overrides`` replacing them, e.g.
    ``name="fgsm"``, which also drops a ``_target_``) minus ``batch_size``, with step sizes parsed
    ("2/255" -> float)."""
    items = cfg.items() if not isinstance(cfg, DictConfig) else \
        OmegaConf.to_container(cfg, resolve=True).items()  # type: ignore[union-attr]
    kwargs = {**{k: v for k, v in items if k != "batch_size"}, **overrides}
    if "name" in overrides:
        kwargs.pop(TARGET, None)
    for k in STEP_KEYS:
        if kwargs.get(k) is not None:
            kwargs[k] = parse_epsilon(kwargs[k], attack_norm(kwargs))  # type: ignore[arg-type]
    return kwargs


def build_attack(model: nn.Module, eps: float, cfg: DictConfig | dict, *, n_classes: int | None = None,
                 seed: int = 0, **overrides: object) -> AttackFn:
    """The attack ``cfg`` describes (``overrides`` replace its keys, e.g. ``name="fgsm"``).

    A registered attack also gets ``n_classes`` (the data's; attacks that need it refuse None) and
    ``seed`` (the run's); a ``_target_`` callable gets only its YAML's keys."""
    kwargs = attack_kwargs(cfg, **overrides)
    fn = ATTACKS.resolve(DictConfig({k: v for k, v in kwargs.items() if k in ("name", TARGET)}))
    if not kwargs.get(TARGET):
        kwargs.update(n_classes=n_classes, seed=seed)
    kwargs.pop("name", None)
    kwargs.pop(TARGET, None)
    return fn(model, eps=eps, **kwargs)


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's own train/eval flag put back on exit, exactly as it was (also on an error).

    ``frozen`` puts back the flag of ``model`` alone, with ``model.train(flag)``, which gives every
    submodule that same flag. A model whose modules disagree came back changed: the perf.amp=bf16
    ``Autocast`` wrapper (built in train mode around the eval-mode compressed model) returned it
    with BatchNorm in train mode, normalising by batch statistics in every later forward of the
    shared model (issue 32); so did a model fine-tuned with BatchNorm held in eval. The flag is
    set, not ``train()``-ed, so that no module's children are touched."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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
    n_grad: int = 0  # images through forward + input-gradient (0 when a FGSM direction was reused)
    direction: torch.Tensor | None = None  # FGSM only: int8 signs of the n_correct attacked images
    # ``keep`` positions that were attacked (clean-correct) -> their adversarial image, float [0, 1]
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    # Worst-case ensembles only: per evaluation image, the index (in attack_names) of the attack that
    # broke it; -1 = none did, or the image was not attacked (clean-wrong).
    broken_by: torch.Tensor | None = None
    attack_names: tuple[str, ...] = ()
    # quantize=int8 only: the differentiable twin's predictions on the same adversarial images
    # (= clean_pred where not attacked), so the twin-to-int8 transfer gap is visible
    adv_pred_twin: torch.Tensor | None = None

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
    if x.dtype == torch.uint8:
        return to_float(x)
    check_unit_range(x, "evaluation images")
    return x.float()


def evaluate(model: nn.Module, attack: AttackFn, x_images: torch.Tensor, y: torch.Tensor,
             eps: float, batch_size: int, desc: str = "attack", *, clean_pred: torch.Tensor | None = None,
             direction: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> EvalResult:
    """Clean predictions, then attack the correctly classified images batch by batch.

    ``x_images``: uint8 (0..255) or float in [0, 1]; anything else is refused by ``predict``,
    before any image is attacked. ``clean_pred``: this model's predictions on these images, if
    already known. ``direction``: for ``FGSM``, the int8 signs of an earlier evaluation of the same
    model and images (``EvalResult.direction``), so that another eps costs no gradient.

    ``model`` comes back as it came: its weights and statistics, and each module's mode."""
    with modes_kept(model), frozen(model):
        if clean_pred is None:
            clean_pred = predict(model, x_images, batch_size)
        correct_idx = (clean_pred == y).nonzero().flatten()
        keep_direction = isinstance(attack, FGSM)
        if direction is not None and (not keep_direction or len(direction) != len(correct_idx)):
            raise ValueError(f"direction: {len(direction)} FGSM signs given for {len(correct_idx)} "
                             f"correct images and attack {type(attack).__name__}; allowed: the "
                             f"EvalResult.direction of the same model and images, with FGSM")
        directions: list[torch.Tensor] = []
        kept: dict[int, torch.Tensor] = {}
        keep_on = keep.to(correct_idx.device) if keep is not None and len(keep) else None
        adv_pred = clean_pred.clone()
        names = tuple(getattr(attack, "names", ()))
        broken_by = torch.full_like(clean_pred, -1) if names else None
        adv_pred_twin = clean_pred.clone() if pairs(model) else None
        n_fooled, n_batches, max_dist, n_grad0 = 0, 0, 0.0, getattr(attack, "n_grad", 0)
        n_total = -(-len(correct_idx) // batch_size)
        for i in progress(range(0, len(correct_idx), batch_size), desc=desc, unit="batch"):
            idx = correct_idx[i:i + batch_size]
            x, yb = as_pixels(x_images[idx]), y[idx]
            if keep_direction:
                d = direction[i:i + batch_size] if direction is not None else attack.direction(x, yb)
                directions.append(d)
                x_adv, dist = attack_checked(lambda xb, _, d=d: attack.step(xb, d), x, yb, eps)
            else:
                with heartbeat(f"{desc}: batch {i // batch_size + 1} of {n_total} ({len(idx)} images)"):
                    x_adv, dist = attack_checked(attack, x, yb, eps)  # labels verified unchanged
            max_dist = max(max_dist, dist)
            n_batches += 1
            if broken_by is not None:
                broken_by[idx] = attack.last_broken_by.to(broken_by.device)
            with torch.inference_mode():
                p = model(x_adv).argmax(1)  # an int8 model: the int8 network decides
                if adv_pred_twin is not None:
                    with twin_mode(model):
                        adv_pred_twin[idx] = model(x_adv).argmax(1)
            adv_pred[idx] = p
            n_fooled += int((p != yb).sum())
            for j in (torch.isin(idx, keep_on).nonzero().flatten().tolist() if keep_on is not None else ()):
                kept[int(idx[j])] = x_adv[j].detach().clone()
    if keep_direction:
        direction = torch.cat(directions) if directions else \
            torch.empty((0, *x_images.shape[1:]), dtype=torch.int8, device=x_images.device)
    res = EvalResult(n_eval=len(y), n_correct=len(correct_idx), n_fooled=n_fooled,
                     clean_pred=clean_pred, adv_pred=adv_pred, n_batches_checked=n_batches,
                     max_dist=max_dist, n_grad=getattr(attack, "n_grad", 0) - n_grad0,
                     direction=direction if keep_direction else None, broken_by=broken_by,
                     attack_names=names, adv_pred_twin=adv_pred_twin, kept=kept)
    if res.n_correct == 0:
        log.warning("the model classifies none of the %d evaluation images correctly: asr is NaN",
                    res.n_eval)
    return res
