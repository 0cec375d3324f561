"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, arXiv:1902.02918): PREDICT and CERTIFY,
and an L2 attack on the smoothed classifier (Salman et al. 2019, arXiv:1906.04584).

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). CERTIFY draws ``n0``
noisy copies to guess the top class c_A, then ``n`` more to count n_A; with probability >= 1 - alpha
p_A >= the one-sided Clopper-Pearson lower bound p_lo, and if p_lo > 1/2, g is constant on the L2
ball of radius sigma * Phi^-1(p_lo) around x; otherwise it abstains. Noise is drawn on the model's
device from a seeded generator, ``batch`` copies per forward pass.

Written here (about 40 lines with scipy) rather than taken from ART: its
``PyTorchRandomizedSmoothing.certify`` took ~400 s per 100 ResNet-20 images at n = 1000 on this CPU
and needs statsmodels, which it does not declare. ``scripts/crosscheck/smoothing_vs_art.py`` compares the two on
one model and one set of images.

A certificate is a lower bound; ``smooth_adv`` gives the matching upper bound for the *smoothed*
classifier (an attack on the base model alone says little about g): PGD in L2 on
-log E_noise[softmax(f(x' + noise))_y], the expectation estimated from ``samples`` fresh noise draws
per step (Salman et al.'s SmoothAdv), then PREDICT on the attacked image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ABSTAIN = -1


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion from k of n."""
    from scipy.stats import beta  # lazily: scipy.stats costs ~1.7 s at every start-up

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


@torch.no_grad()
def sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, n_classes: int, batch: int,
                  gen: torch.Generator) -> torch.Tensor:
    """Class counts (n_classes,) of ``model`` on ``num`` copies of image ``x`` (C, H, W) plus noise."""
    counts = torch.zeros(n_classes, dtype=torch.long)
    left = num
    while left > 0:
        b = min(batch, left)
        noise = torch.randn((b, *x.shape), generator=gen, device=x.device) * sigma
        pred = model(x.unsqueeze(0) + noise).argmax(1)
        counts += torch.bincount(pred.cpu(), minlength=n_classes)
        left -= b
    return counts


@dataclass
class Certificate:
    pred: int     # the smoothed prediction, or ABSTAIN
    radius: float  # certified L2 radius (0 when abstaining)
    p_lower: float


def certify(model: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, n_classes: int,
            batch: int, gen: torch.Generator) -> Certificate:
    """Cohen et al.'s CERTIFY for one image."""
    guess = int(sample_counts(model, x, sigma, n0, n_classes, batch, gen).argmax())
    n_a = int(sample_counts(model, x, sigma, n, n_classes, batch, gen)[guess])
    p_lo = clopper_pearson_lower(n_a, n, alpha)
    if p_lo < 0.5:
        return Certificate(ABSTAIN, 0.0, p_lo)
    from scipy.stats import norm

    return Certificate(guess, float(sigma * norm.ppf(p_lo)), p_lo)


def predict(model: nn.Module, x: torch.Tensor, sigma: float, n: int, alpha: float, n_classes: int, batch: int,
            gen: torch.Generator) -> int:
    """Cohen et al.'s PREDICT: the top class of ``n`` noisy copies, or ABSTAIN when a two-sided binomial
    test cannot tell it from the runner-up at level ``alpha`` (then P(wrong class returned) <= alpha)."""
    top2 = sample_counts(model, x, sigma, n, n_classes, batch, gen).topk(2)
    n_a, n_b = (int(v) for v in top2.values)
    from scipy.stats import binomtest

    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


def smooth_adv(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, radius: float, steps: int,
               samples: int, gen: torch.Generator) -> torch.Tensor:
    """SmoothAdv PGD (Salman et al. 2019): images (B, C, H, W) in [0, 1] -> attacked images with
    ||x' - x||_2 <= ``radius`` per image, in [0, 1], maximising the smoothed classifier's loss
    -log mean_i softmax(f(x' + sigma * z_i))_y over ``samples`` draws z_i per step. Step 2 * radius /
    steps (their choice), steepest L2 ascent, projection onto the ball and the box each step."""
    if radius == 0 or steps == 0:
        return x.clone()
    step = 2.0 * radius / steps
    b = len(x)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        xs = (x + delta).repeat_interleave(samples, 0)
        noise = torch.randn(xs.shape, generator=gen, device=x.device) * sigma
        p = torch.softmax(model(xs + noise), 1).view(b, samples, -1).mean(1)
        loss = -torch.log(p.gather(1, y.view(-1, 1)).clamp_min(1e-12)).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g = grad.flatten(1)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta = delta + step * g.view_as(delta)
            n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (radius / n).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()
