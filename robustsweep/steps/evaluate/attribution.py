"""The ``attribution`` evaluator: Integrated Gradients (Sundararajan et al. 2017,
arXiv:1703.01365) via captum. Configured by the ``attribution`` group (``none`` turns it off).

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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.core import cost
from robustsweep.core.guards import check_unit_range, frozen
from robustsweep.core.params import check, nonnegative_int, positive_int
from robustsweep.core.progress import heartbeat
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate import CellShape, EvalContext, Evaluator, Outcome, WorkItems, register_evaluator

if TYPE_CHECKING:  # captum and matplotlib are imported when a job attributes, not before
    from captum.attr import IntegratedGradients
    from matplotlib.figure import Figure

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


@dataclass
class IGPart:
    """The IG of one set of inputs (clean or adversarial): what a cache may keep and reuse."""

    attr: torch.Tensor  # (K, C, H, W)
    delta: torch.Tensor  # (K,)
    logits: torch.Tensor  # (K, classes) of the inputs
    steps: torch.Tensor  # (K,) steps used per image
    n_bad: int  # still incomplete at the cap


def _ig_part(model: nn.Module, ig: IntegratedGradients, inp: torch.Tensor, base: torch.Tensor,
             f_base: torch.Tensor, y: torch.Tensor, n_steps: int, cap: int, internal_batch_size: int,
             what: str) -> IGPart:
    """IG of ``inp`` with per-image doubling of n_steps until completeness holds or ``cap``."""
    with torch.inference_mode():
        logits = model(inp)
    gap = logits.gather(1, y[:, None])[:, 0] - f_base
    bad = torch.ones(len(y), dtype=torch.bool, device=y.device)
    attr, delta = torch.zeros_like(inp), torch.zeros(len(y), device=inp.device)
    steps = torch.full((len(y),), n_steps)
    n = n_steps
    while True:
        a, d = ig.attribute(inp[bad], baselines=base[bad], target=y[bad], n_steps=n,
                            internal_batch_size=internal_batch_size, return_convergence_delta=True)
        attr[bad], delta[bad] = a.detach(), d.detach().to(delta.dtype)
        steps[bad.cpu()] = n
        bad = incomplete(delta, gap)
        if not bad.any() or n * 2 > cap:
            break
        n *= 2
        log.info("IG: %d of %d %s attributions incomplete; recomputing them with n_steps=%d",
                 int(bad.sum()), len(y), what, n)
    return IGPart(attr, delta, logits, steps, int(bad.sum()))


def integrated_gradients(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                         indices: torch.Tensor, n_steps: int, baseline: str,
                         internal_batch_size: int, max_n_steps: int | None = None,
                         clean: IGPart | None = None) -> tuple[Attributions, IGPart]:
    """IG for clean and adversarial inputs (float [0, 1]), target = true label.

    An attribution that breaks completeness is recomputed with twice the steps, alone, until it
    holds or ``max_n_steps`` is reached (default: no doubling). Only the failing images are
    recomputed: on pruned CIFAR ResNets one image in six may need 512 steps, the rest 64.
    ``clean``: the clean half from an earlier call with the same model, images and settings (it
    does not depend on the attack or eps); returned as the second value for the next call."""
    from captum.attr import IntegratedGradients

    check_unit_range(x, "IG inputs")
    check_unit_range(x_adv, "IG adversarial inputs")
    cap = max(n_steps, max_n_steps or n_steps)
    with frozen(model):
        ig = IntegratedGradients(model)
        base = torch.full_like(x, BASELINES[baseline])
        with torch.inference_mode():
            f_base = model(base).gather(1, y[:, None])[:, 0]
        args = (base, f_base, y, n_steps, cap, internal_batch_size)
        if clean is None:
            clean = _ig_part(model, ig, x, *args, "clean")
        adv = _ig_part(model, ig, x_adv, *args, "adversarial")
    n_bad = clean.n_bad + adv.n_bad
    if n_bad:
        log.warning("IG: %d of %d attributions still incomplete at the cap n_steps=%d "
                    "(attribution.max_n_steps)", n_bad, 2 * len(y), cap)
    np_ = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return Attributions(
        indices=np_(indices), images=np_(x), adv_images=np_(x_adv), labels=np_(y),
        clean_pred=np_(clean.logits.argmax(1)), adv_pred=np_(adv.logits.argmax(1)),
        ig_clean=np_(clean.attr), ig_adv=np_(adv.attr),
        delta_clean=np_(clean.delta), delta_adv=np_(adv.delta),
        n_steps=int(max(clean.steps.max(), adv.steps.max())), baseline=baseline, n_incomplete=n_bad,
        steps_clean=clean.steps.numpy(), steps_adv=adv.steps.numpy(),
    ), clean


def ig_maps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_steps: int, cap: int,
            internal_batch_size: int) -> np.ndarray:
    """IG maps (N, C, H, W) of the true-label logit, black baseline, with the same per-image
    completeness doubling up to ``cap`` steps (for the drift evaluator)."""
    from captum.attr import IntegratedGradients

    with frozen(model):
        base = torch.zeros_like(x)
        with torch.inference_mode():
            f_base = model(base).gather(1, y[:, None])[:, 0]
        part = _ig_part(model, IntegratedGradients(model), x, base, f_base, y, n_steps, max(cap, n_steps),
                        internal_batch_size, "drift")
    if part.n_bad:
        log.warning("IG (drift): %d of %d attributions incomplete at n_steps=%d", part.n_bad, len(y), cap)
    return part.attr.cpu().numpy()


_TEMPLATES: dict[tuple[int, int], tuple[Figure, np.ndarray, list[Any]]] = {}


def _template(k: int, channels: int) -> tuple[Figure, np.ndarray, list[Any]]:
    """The figure's axes, images and colour bars for k rows, built once per process and refilled
    for every cell: creating its 30 axes costs ~0.6 s (matplotlib builds every tick), refilling
    them nothing. A pyplot-free ``Figure``, so nothing accumulates in pyplot's figure list."""
    if (k, channels) in _TEMPLATES:
        return _TEMPLATES[(k, channels)]
    from matplotlib.figure import Figure  # the Agg canvas: headless, figures are files

    height = 2.3 * k + 0.6
    fig = Figure(figsize=(9.5, height))
    axes = fig.subplots(k, 5, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.06]})
    fig.subplots_adjust(left=0.02, right=0.92, bottom=0.02, top=1 - 0.75 / height, wspace=0.12,
                        hspace=0.45)
    bars = []
    for r in range(k):
        for c in range(4):
            ax = axes[r, c]
            if c in (1, 3):  # IG maps: diverging, limits set per row
                ax.imshow(np.zeros((2, 2)), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            elif channels == 1:
                ax.imshow(np.zeros((2, 2)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(np.zeros((2, 2, 3)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        bars.append(fig.colorbar(axes[r, 3].images[0], cax=axes[r, 4], label="attribution\n(logit units)"))
    fig.suptitle("", fontsize=10)
    _TEMPLATES[(k, channels)] = (fig, axes, bars)
    return _TEMPLATES[(k, channels)]


def _pixels(img: np.ndarray) -> np.ndarray:
    return img[0] if img.shape[0] == 1 else np.clip(img.transpose(1, 2, 0), 0, 1)


def plot_attributions(a: Attributions, classes: list[str], title: str) -> Figure:
    """Rows = images; columns: image, IG clean, adversarial image, IG adversarial.

    The returned figure is refilled by the next call with the same number of rows and channels:
    save it before plotting the next cell."""
    k = len(a.labels)
    fig, axes, bars = _template(k, a.images.shape[1])
    name = lambda i: classes[int(i)] if int(i) < len(classes) else str(i)  # noqa: E731
    for r in range(k):
        m_clean, m_adv = a.ig_clean[r].sum(0), a.ig_adv[r].sum(0)  # sum over colour channels
        vmax = float(max(np.abs(m_clean).max(), np.abs(m_adv).max(), 1e-12))
        tiles = (_pixels(a.images[r]), m_clean, _pixels(a.adv_images[r]), m_adv)
        titles = (f"#{a.indices[r]} true {name(a.labels[r])}\npred {name(a.clean_pred[r])}",
                  f"IG clean (Δ={a.delta_clean[r]:+.1e})",
                  f"adversarial\npred {name(a.adv_pred[r])}",
                  f"IG adversarial (Δ={a.delta_adv[r]:+.1e})")
        for c, (tile, t) in enumerate(zip(tiles, titles, strict=True)):
            im = axes[r, c].images[0]
            im.set_data(tile)
            im.set_extent((-0.5, tile.shape[1] - 0.5, tile.shape[0] - 0.5, -0.5))
            if c in (1, 3):
                im.set_clim(-vmax, vmax)  # symmetric, shared by the row's two maps
            axes[r, c].set_title(t, fontsize=8)
        bars[r].update_normal(axes[r, 3].images[0])
    fig.suptitle(title, fontsize=10)
    return fig


def run(ctx: EvalContext) -> Outcome:
    """IG on k fixed images, clean and attacked; write figure + raw arrays."""
    ds, a = ctx.ds, ctx.cfg.attribution
    robust = ctx.results["robust"]
    k = min(a.n_images, robust.res.n_eval)
    t0 = time.perf_counter()
    pos = ds.showcase_pos(k)
    idx = ds.eval_idx[pos.to(ds.eval_idx.device)]
    x, y = to_float(ds.x_test[idx]), ds.y_test[idx]
    x_adv = robust.adversarial(ctx, pos)
    # The clean half does not depend on the attack or eps: one per model and images.
    key = ("ig", OmegaConf.to_container(a, resolve=True), idx.tolist())
    with heartbeat(f"integrated gradients on {len(idx)} images, {a.n_steps} steps"):
        attr, clean = integrated_gradients(ctx.model, x, x_adv, y, idx, a.n_steps, a.baseline,
                                           a.internal_batch_size, max_n_steps=a.get("max_n_steps"),
                                           clean=ctx.memo.get("ig_clean", *key))
    ctx.memo.put("ig_clean", clean, *key)
    fig = plot_attributions(attr, ds.classes, f"{ctx.title} | IG {attr.n_steps} steps, {a.baseline} baseline")
    out = ctx.stage / "ig"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "ig_maps.png", dpi=110)
    attr.save_npz(str(out / "attributions.npz"))
    metrics = {"ig_delta": attr.mean_abs_delta, "ig_n_steps": attr.n_steps,
               "ig_n_incomplete": attr.n_incomplete, "ig_s": time.perf_counter() - t0}
    return Outcome(metrics, {"ig_incomplete"} if attr.n_incomplete else set(), attr)


def _check(cfg: DictConfig) -> None:
    nonnegative_int(cfg.attribution, "n_images")
    if cfg.attribution.n_images > 0:
        positive_int(cfg.attribution, "n_steps")
        positive_int(cfg.attribution, "internal_batch_size")
        check(cfg.attribution.baseline in BASELINES, "attribution.baseline", cfg.attribution.baseline,
              ", ".join(BASELINES))
        cap = cfg.attribution.get("max_n_steps")
        check(cap is None or (isinstance(cap, int) and cap >= cfg.attribution.n_steps),
              "attribution.max_n_steps", cap,
              f"null (no doubling) or an integer >= attribution.n_steps ({cfg.attribution.n_steps})")


def _work(cfg: DictConfig, cell: CellShape) -> WorkItems:
    """IG on n_images: the clean maps once per model (the memo), the adversarial ones per cell."""
    a = cfg.attribution
    ig = cost.doubling(int(a.n_steps), a.get("max_n_steps")) * min(int(a.n_images), cell.n_eval)
    return [(("ig_clean", cell.model), ig), (None, ig)]


register_evaluator(Evaluator(
    name="attribution", work=_work, group="attribution", run=run, reads=("robust",), check=_check,
    metrics=("ig_delta", "ig_n_steps", "ig_n_incomplete", "ig_s"),
    reasons={"ig_incomplete": "Integrated Gradients did not reach completeness at the n_steps cap"},
    enabled=lambda cfg: (cfg.attribution.get("n_images") or 0) > 0,
    adversarial_of=lambda ctx: ctx.ds.showcase_pos(min(int(ctx.cfg.attribution.n_images),
                                                       len(ctx.ds.eval_idx))),
))
