"""Integrated Gradients (Sundararajan et al. 2017, arXiv:1703.01365) via captum.

For K fixed images (one per class from the evaluation subset: the same indices in every job of
a sweep), attribute the true-label logit for the clean and the adversarial input. The completeness
axiom says the attributions sum to F(x) - F(baseline); captum's convergence delta is the gap, and
``ig_delta`` = mean |delta| over all 2K attributions.

Completeness is enforced, not just reported: an attribution is complete when
|delta| <= max(0.05 * |F(x) - F(baseline)|, 1e-3) (F = the true-label logit). An incomplete one is
recomputed with doubled ``n_steps`` (up to ``max_n_steps``); what is still incomplete at the cap is
counted (``ig_n_incomplete``) and the cell is tagged ``suspect=ig_incomplete``.

The figure has one row per image: image, IG clean, adversarial image, IG adversarial. IG maps are
summed over colour channels and drawn with a diverging colormap whose limits are symmetric and
shared by the clean and adversarial map of the row, so the two can be compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt
import numpy as np
import torch
from captum.attr import IntegratedGradients
from matplotlib.figure import Figure
from torch import nn

from robustsweep.attacks import frozen

log = logging.getLogger(__name__)

BASELINES = {"black": 0.0, "gray": 0.5, "white": 1.0}


@dataclass
class Attributions:
    indices: np.ndarray  # (K,) indices into the test split
    images: np.ndarray  # (K, C, H, W) float [0, 1]
    adv_images: np.ndarray
    labels: np.ndarray  # (K,)
    clean_pred: np.ndarray
    adv_pred: np.ndarray
    ig_clean: np.ndarray  # (K, C, H, W)
    ig_adv: np.ndarray
    delta_clean: np.ndarray  # (K,) convergence deltas
    delta_adv: np.ndarray
    n_steps: int  # the most steps any attribution needed (after doubling)
    baseline: str
    n_incomplete: int = 0  # of the 2K attributions, those failing completeness at the cap
    steps_clean: np.ndarray | None = None  # (K,) steps used per image
    steps_adv: np.ndarray | None = None

    @property
    def mean_abs_delta(self) -> float:
        return float(np.abs(np.concatenate([self.delta_clean, self.delta_adv])).mean())

    def save_npz(self, path: str) -> None:
        np.savez_compressed(path, **{k: v for k, v in self.__dict__.items() if v is not None})


REL_TOL, ABS_TOL = 0.05, 1e-3  # completeness: |delta| <= max(REL_TOL * |F(x) - F(b)|, ABS_TOL)


def incomplete(delta: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """Which attributions break completeness (bool per image); ``gap`` = F(x) - F(baseline)."""
    return delta.abs() > torch.clamp(REL_TOL * gap.abs(), min=ABS_TOL)


def integrated_gradients(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                         indices: torch.Tensor, n_steps: int, baseline: str,
                         internal_batch_size: int, max_n_steps: int | None = None) -> Attributions:
    """IG for clean and adversarial inputs (float [0, 1]), target = true label.

    An attribution that breaks completeness is recomputed with twice the steps, alone, until it
    holds or ``max_n_steps`` is reached (default: no doubling). Only the failing images are
    recomputed: on pruned CIFAR ResNets one image in six may need 512 steps, the rest 64."""
    from robustsweep.checks import check_unit_range

    check_unit_range(x, "IG inputs")
    check_unit_range(x_adv, "IG adversarial inputs")
    cap = max(n_steps, max_n_steps or n_steps)
    steps = torch.full((2, len(y)), n_steps)  # steps used per (clean/adversarial, image)
    out = []
    with frozen(model):
        ig = IntegratedGradients(model)
        base = torch.full_like(x, BASELINES[baseline])
        with torch.inference_mode():
            f_base = model(base).gather(1, y[:, None])[:, 0]
            logits = [model(inp) for inp in (x, x_adv)]
        for i, inp in enumerate((x, x_adv)):
            gap = logits[i].gather(1, y[:, None])[:, 0] - f_base
            bad = torch.ones(len(y), dtype=torch.bool, device=y.device)
            attr, delta = torch.zeros_like(inp), torch.zeros(len(y), device=inp.device)
            n = n_steps
            while True:
                a, d = ig.attribute(inp[bad], baselines=base[bad], target=y[bad], n_steps=n,
                                    internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
                attr[bad], delta[bad] = a.detach(), d.detach().to(delta.dtype)
                steps[i, bad.cpu()] = n
                bad = incomplete(delta, gap)
                if not bad.any() or n * 2 > cap:
                    break
                n *= 2
                log.info("IG: %d of %d %s attributions incomplete; recomputing them with n_steps=%d",
                         int(bad.sum()), len(y), ("clean", "adversarial")[i], n)
            out.append((attr, delta, int(bad.sum())))
        n_bad = out[0][2] + out[1][2]
        if n_bad:
            log.warning("IG: %d of %d attributions still incomplete at the cap n_steps=%d "
                        "(attribution.max_n_steps)", n_bad, 2 * len(y), cap)
        clean_pred, adv_pred = logits[0].argmax(1), logits[1].argmax(1)
    np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return Attributions(
        indices=np_(indices), images=np_(x), adv_images=np_(x_adv), labels=np_(y),
        clean_pred=np_(clean_pred), adv_pred=np_(adv_pred),
        ig_clean=np_(out[0][0]), ig_adv=np_(out[1][0]),
        delta_clean=np_(out[0][1]), delta_adv=np_(out[1][1]), n_steps=int(steps.max()),
        baseline=baseline, n_incomplete=n_bad, steps_clean=steps[0].numpy(), steps_adv=steps[1].numpy(),
    )


def _show_image(ax: plt.Axes, img: np.ndarray) -> None:
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest")


def plot_attributions(a: Attributions, classes: list[str], title: str) -> Figure:
    """Rows = images; columns: image, IG clean, adversarial image, IG adversarial."""
    k = len(a.labels)
    fig, axes = plt.subplots(k, 4, figsize=(9.5, 2.3 * k + 0.6), squeeze=False,
                             constrained_layout=True)
    for r in range(k):
        m_clean, m_adv = a.ig_clean[r].sum(0), a.ig_adv[r].sum(0)  # sum over colour channels
        vmax = float(max(np.abs(m_clean).max(), np.abs(m_adv).max(), 1e-12))
        name = lambda i: classes[int(i)] if int(i) < len(classes) else str(i)  # noqa: E731
        _show_image(axes[r, 0], a.images[r])
        axes[r, 0].set_title(f"#{a.indices[r]} true {name(a.labels[r])}\npred {name(a.clean_pred[r])}",
                             fontsize=8)
        axes[r, 1].imshow(m_clean, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        axes[r, 1].set_title(f"IG clean (Δ={a.delta_clean[r]:+.1e})", fontsize=8)
        _show_image(axes[r, 2], a.adv_images[r])
        axes[r, 2].set_title(f"adversarial\npred {name(a.adv_pred[r])}", fontsize=8)
        im = axes[r, 3].imshow(m_adv, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        axes[r, 3].set_title(f"IG adversarial (Δ={a.delta_adv[r]:+.1e})", fontsize=8)
        fig.colorbar(im, ax=axes[r, 1:4:2].tolist(), shrink=0.8, label="attribution (logit units)")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig
