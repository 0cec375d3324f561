"""Training objectives that defend: adversarial training, TRADES, Gaussian noise, distillation.

Each is one loss ``(model, x, y, node, train_cfg) -> (loss, logits)`` registered in
robustsweep.steps.train.OBJECTIVES, used for the dense baseline (``objective=<name>``) and for the
fine-tune after compression (``defend=<name>``). ``x`` is a batch of augmented training images in
[0, 1]; the model normalises inside ``forward``. Budgets are in pixel units (L-inf), like
``epsilon``; fractions such as ``8/255`` are accepted.

- ``pgd_at``: Madry et al. 2018, arXiv:1706.06083. Minimise the cross-entropy at the PGD
  adversary (``steps`` signed steps of ``step_size`` from a uniform random start in the eps-ball).
- ``fast_at``: Wong, Rice & Kolter 2020, arXiv:2001.03994 ("Fast is better than free"). One FGSM
  step of ``alpha`` (default 1.25 eps) from a uniform random start, projected back to the ball:
  PGD-AT's robustness at ~2 forward/backward passes per batch, the CPU-affordable one.
- ``trades``: Zhang et al. 2019, arXiv:1901.08573. CE(f(x), y) + beta * KL(f(x) || f(x')), x' the
  PGD maximiser of that KL from x + 0.001 N(0, 1) (their code's start), model in eval mode for
  the inner maximisation as in their code.
- ``noise``: Gaussian augmentation x + sigma N(0, 1), unclipped (Cohen et al. 2019,
  arXiv:1902.02918): the base classifier of randomized smoothing.
- ``ibp``: certified training by interval bound propagation (Gowal et al. 2018, arXiv:1810.12715):
  kappa * CE(f(x), y) + (1 - kappa) * CE(worst-case logits, y), the worst case from IBP's lower
  bounds on logit_y - logit_j over the eps-ball (robustsweep.steps.bounds); eps ramps linearly
  from 0 after ``warmup`` of the training steps over ``ramp`` of them, kappa from 1 to ``kappa``
  with it. The bound is of the network the clean batch trains: BatchNorm with that batch's
  statistics (as in Gowal et al.'s and Zhang et al.'s code).
- ``distill``: defensive distillation, Papernot et al. 2016, arXiv:1511.04508. A teacher (a copy
  of the model as it enters training, trained with the same recipe, seed and epochs) is trained on
  the labels with softmax at temperature T; the student (the model) is trained at T on the
  teacher's soft labels; deployed at T = 1 (its raw logits), so its softmax saturates and input
  gradients of the cross-entropy vanish. Carlini & Wagner 2016 (arXiv:1607.04311) broke it: it is
  here as the known-broken defence that the per-cell sanity probe must catch. Both losses are
  scaled by T, so that the gradient in the logits is softmax(z/T) - target, not 1/T of it
  (unscaled, a digits CNN at T = 100 does not leave chance in 30 epochs; Hinton et al.'s T^2 made
  the student diverge: measured).

BatchNorm during the inner attack (``bn_mode``): ``train`` (the Madry and Wong et al. recipes: the
attack's forward passes use and update batch statistics) or ``eval`` (TRADES' code: running
statistics, not updated). The inner attacks are plain tensors ops on the training batch: they never
go through the evaluation guards (robustsweep.core.guards), which are for scored attacks only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from robustsweep.core import cost
from robustsweep.core.errors import ConfigError
from robustsweep.core.params import check, key_of, number_in, parse_epsilon, positive_int, positive_number
from robustsweep.steps.attacks import PGD, attack_norm
from robustsweep.steps.bounds import BoundError, batch_stats, check_supported, ibp_margins, network_for_checks
from robustsweep.steps.data import Dataset
from robustsweep.steps.train import Loss, register_objective, train_model

log = logging.getLogger(__name__)
BN_MODES = ("train", "eval")
WARN_RATIO = 4.0  # warn when the evaluation eps is this many times smaller than the training eps


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """BatchNorm (and any train/eval-dependent layer) in ``mode`` for the inner attack."""
    was = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was)


def _eps(node: DictConfig, key: str = "eps") -> float:
    return parse_epsilon(node[key], "linf")


def _check_eps(node: DictConfig, cfg: DictConfig, *, step_key: str | None) -> None:
    """The inner budget, its step and bn_mode; warn when the evaluation eps is much smaller."""
    allowed = "a budget in (0, 1] in pixel units (L-inf), e.g. 8/255"
    try:
        eps = _eps(node)
    except ConfigError:
        eps = -1.0
    check(eps > 0, key_of(node, "eps"), node.get("eps"), allowed)
    if step_key is not None and node.get(step_key) is not None:
        try:
            step = _eps(node, step_key)
        except ConfigError:
            step = -1.0
        check(0 < step <= eps, key_of(node, step_key), node.get(step_key),
              f"null (the objective's default) or a step in (0, eps = {eps:.6g}], e.g. 2/255")
    check(node.get("bn_mode", "train") in BN_MODES, key_of(node, "bn_mode"), node.get("bn_mode"),
          " or ".join(BN_MODES))
    if attack_norm(cfg.attack) == "linf":
        try:
            eval_eps = parse_epsilon(cfg.epsilon, "linf")
        except ConfigError:
            return
        if eval_eps * WARN_RATIO < eps:
            log.warning("%s=%s (%.4g) is more than %g times the evaluation epsilon=%s (%.4g): the "
                        "model is evaluated far inside the ball it was trained for", key_of(node, "eps"),
                        node.eps, eps,
                        WARN_RATIO, cfg.epsilon, eval_eps)


# ---- PGD adversarial training --------------------------------------------------------------------

def _check_pgd_at(node: DictConfig, cfg: DictConfig) -> None:
    positive_int(node, "steps")
    check(isinstance(node.get("random_start", True), bool), key_of(node, "random_start"),
          node.get("random_start"),
          "true or false")
    _check_eps(node, cfg, step_key="step_size")


@register_objective("pgd_at", check=_check_pgd_at, work=lambda node: cost.Work(train=1, grad=node.steps))
def pgd_at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
                train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at the PGD adversary (Madry et al.); logits are the adversarial ones."""
    eps = _eps(node)
    alpha = _eps(node, "step_size") if node.get("step_size") is not None else 2.5 * eps / node.steps
    with bn_mode(model, node.get("bn_mode", "train")):
        x_adv = PGD(model, eps=eps, alpha=alpha, steps=node.steps,
                    random_start=node.get("random_start", True))(x, y)
    out = model(x_adv)
    return F.cross_entropy(out, y, label_smoothing=train.label_smoothing), out


# ---- FGSM adversarial training with a random start ("fast is better than free") -----------------

def _check_fast_at(node: DictConfig, cfg: DictConfig) -> None:
    _check_eps(node, cfg, step_key=None)
    alpha = node.get("alpha")
    if alpha is not None:
        try:
            value = _eps(node, "alpha")
        except ConfigError:
            value = -1.0
        # Wong et al. use alpha = 1.25 eps; beyond 2 eps the step overshoots the ball from any start
        # and catastrophic overfitting sets in early (their figure 3).
        check(0 < value <= 2 * _eps(node), key_of(node, "alpha"), alpha,
              "null (= 1.25 * eps, Wong et al.) or a step in (0, 2 * eps]")


@register_objective("fast_at", check=_check_fast_at, work=lambda node: cost.Work(train=1, grad=1))
def fast_at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
                 train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at one random-start FGSM step (Wong et al. 2020, algorithm 3)."""
    eps = _eps(node)
    alpha = _eps(node, "alpha") if node.get("alpha") is not None else 1.25 * eps
    with bn_mode(model, node.get("bn_mode", "train")):
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = (torch.clamp(x + delta, 0, 1) - x).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
        delta = torch.clamp(delta.detach() + alpha * grad.sign(), -eps, eps)
        x_adv = torch.clamp(x + delta, 0, 1)
    out = model(x_adv)
    return F.cross_entropy(out, y, label_smoothing=train.label_smoothing), out


# ---- TRADES ----------------------------------------------------------------------------------

def _check_trades(node: DictConfig, cfg: DictConfig) -> None:
    positive_number(node, "beta")
    positive_int(node, "steps")
    _check_eps(node, cfg, step_key="step_size")


def _kl(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || softmax(logits_adv)) summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="batchmean")


# TRADES: the clean target, the KL ascent, then a step through the clean and the adversarial batch
@register_objective("trades", check=_check_trades,
                    work=lambda node: cost.Work(fwd=1, grad=node.steps, train=2))
def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
                train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(f(x), y) + beta * KL(f(x) || f(x_adv)); x_adv maximises the KL in the eps-ball (Zhang et al.)."""
    eps = _eps(node)
    step = _eps(node, "step_size") if node.get("step_size") is not None else 2.5 * eps / node.steps
    with bn_mode(model, node.get("bn_mode", "eval")):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(node.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(_kl(model(x_adv), p_clean), x_adv)
            x_adv = x_adv.detach() + step * grad.sign()
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0, 1)
    out = model(x)
    robust = _kl(model(x_adv.detach()), F.softmax(out, dim=1))
    return F.cross_entropy(out, y, label_smoothing=train.label_smoothing) + node.beta * robust, out


# ---- Gaussian noise augmentation -------------------------------------------------------------------

def _check_noise(node: DictConfig, cfg: DictConfig) -> None:
    number_in(node, "sigma", 0.0, math.inf,
              "a noise level > 0 in pixel units, e.g. 0.25 (Cohen et al.'s CIFAR-10 values: 0.12, 0.25, "
              "0.5, 1.0)", low_open=True, high_open=True)


@register_objective("noise", check=_check_noise, work=lambda node: cost.Work(train=1))
def noise_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
               train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on x + sigma * N(0, 1), not clipped to [0, 1] (Cohen et al.)."""
    out = model(x + node.sigma * torch.randn_like(x))
    return F.cross_entropy(out, y, label_smoothing=train.label_smoothing), out


# ---- Defensive distillation -------------------------------------------------------------------

def _check_distill(node: DictConfig, cfg: DictConfig) -> None:
    number_in(node, "temperature", 0.0, math.inf,
              "a temperature T > 0 (Papernot et al. use 100; T = 1 is plain self-distillation)",
              low_open=True, high_open=True)


def _at_temperature(t: float) -> Loss:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
             train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        return t * F.cross_entropy(out / t, y), out
    return loss


def _prepare_distill(model: nn.Module, ds: Dataset, train: DictConfig, node: DictConfig, *, seed: int,
                     epochs: int, lr: float) -> Loss:
    """Train the teacher at temperature T (a copy of ``model`` as it is now), return the student's loss."""
    t = float(node.temperature)
    teacher = copy.deepcopy(model)
    log.info("distill: training the teacher at T=%g for %d epoch(s)", t, epochs)
    train_model(teacher, ds, train, seed=seed, epochs=epochs, lr=lr, desc=f"teacher T={t:g}",
                loss_fn=_at_temperature(t))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def student(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
                train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            soft = F.softmax(teacher(x) / t, dim=1)
        out = model(x)
        return -t * (soft * F.log_softmax(out / t, dim=1)).sum(1).mean(), out

    return student


def _prepared(name: str, prepare: Callable[..., Loss]) -> Loss:
    """The registered loss of an objective that builds its per-batch loss in ``prepare`` (run once by
    robustsweep.steps.train.train_model); called directly, it says so."""
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
             train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(f"objective {name} is built before training: train with "
                           f"robustsweep.steps.train.train_model, which calls its prepare() first")

    loss.prepare = prepare  # type: ignore[attr-defined]
    loss.__doc__ = prepare.__doc__
    return loss


# distill: the teacher trained first (same recipe), then its soft labels for the student
distill_loss = register_objective("distill", check=_check_distill, work=lambda node: cost.Work(train=2, fwd=1))(
    _prepared("distill", _prepare_distill))



# ---- certified training by IBP ------------------------------------------------------------------

def _check_ibp(node: DictConfig, cfg: DictConfig) -> None:
    _check_eps(node, cfg, step_key=None)
    number_in(node, "kappa", 0.0, 1.0, "a weight in [0, 1] on the clean loss at the end of the ramp "
              "(Gowal et al.: 0.5)")
    number_in(node, "warmup", 0.0, 1.0, "a fraction of the training steps in [0, 1)", high_open=True)
    number_in(node, "ramp", 0.0, 1.0, "a fraction of the training steps in (0, 1]", low_open=True)
    check(node.warmup + node.ramp <= 1.0, key_of(node, "ramp"), node.ramp,
          f"at most 1 - {key_of(node, 'warmup')} = {1 - node.warmup:g}: the full eps must be reached by "
          f"the end of training")
    net = network_for_checks(cfg)[0]
    try:
        check_supported(net)
    except BoundError as e:
        check(False, key_of(node, "name"), "ibp", f"a model whose layers IBP handles: {e}")


def _prepare_ibp(model: nn.Module, ds: Dataset, train: DictConfig, node: DictConfig, *, seed: int,
                 epochs: int, lr: float) -> Loss:
    """The IBP loss with its schedule over this training's steps."""
    total = epochs * math.ceil(len(ds.x_train) / train.batch_size)
    eps_max, warm, ramp = _eps(node), int(node.warmup * total), max(1, int(node.ramp * total))
    n_classes = len(ds.classes)
    step = [0]

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
             train: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
        frac = min(1.0, max(0.0, (step[0] - warm) / ramp))
        step[0] += 1
        with batch_stats(model) as stats:
            out = model(x)
        clean = F.cross_entropy(out, y, label_smoothing=train.label_smoothing)
        if frac == 0.0:
            return clean, out
        kappa = 1.0 - (1.0 - node.kappa) * frac
        # lower bounds (B, K-1) of the network this batch trains: BatchNorm with its batch statistics
        margins = ibp_margins(model, x, y, eps_max * frac, n_classes, bn_stats=stats)
        # worst-case logits relative to the true class: 0 for y, -margin_j for j != y (class 0 here)
        worst = torch.cat([torch.zeros_like(margins[:, :1]), -margins], dim=1)
        robust = F.cross_entropy(worst, torch.zeros_like(y))
        return kappa * clean + (1.0 - kappa) * robust, out

    return loss


# ibp: the clean batch and its interval bounds (two more passes, lower and upper) in one step
ibp_loss = register_objective("ibp", check=_check_ibp, work=lambda node: cost.Work(train=3))(
    _prepared("ibp", _prepare_ibp))
