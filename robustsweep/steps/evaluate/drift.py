"""The ``drift`` evaluator: does a compressed model attend to other pixels than the dense one?

The seed study claims that Integrated Gradients maps of pruned models "increasingly rely on
high-frequency noise and non-semantic patterns"; Tsipras et al. 2018 (arXiv:1805.12152) claim the
opposite drift for robust models. This measures it. For the same N evaluation images in every
cell (the first ``drift.n_images`` of the evaluation subset), the compressed model's attribution
maps are compared with the dense baseline's on the same inputs, clean and adversarial (the cell's
attack on the compressed model, so both models are attributed on identical images):

* ``drift_spearman`` — Spearman rank correlation of |attribution| (channel-summed, per pixel);
* ``drift_topk`` — overlap of the top ``drift.topk`` share (10 %) of pixels by |attribution|;
* ``drift_cosine`` — cosine similarity of the signed maps (all channels);
* ``ig_hf_share`` — the compressed map's high-frequency share: spectral energy (2-D FFT power,
  summed over channels) above half the Nyquist radius, over all energy. The direct test of
  "relies on high-frequency patterns"; ``ig_hf_share_dense`` is the dense model's, and
  ``drift_hf_delta`` the per-image difference (compressed - dense) on the same images, whose
  interval says whether compression moved the share beyond the noise;
* ``ig_gini`` — concentration of |attribution| (Gini coefficient; 0 = uniform, 1 = one pixel);

each as the mean over images with a 95 % percentile-bootstrap interval (``_lo``/``_hi``), and with
an ``_adv`` suffix for the adversarial inputs. Per-image values go to ``drift/drift.npz``.

**Attribution sanity** (Adebayo et al. 2018, arXiv:1810.03292, model-parameter randomisation): the
compressed model's maps are recomputed with re-initialised weights on ``drift.n_random`` images;
if their rank correlation with the trained model's maps is not below ``drift.random_max_spearman``,
the maps show the input rather than the model: ``suspect=attribution_insensitive``. (Ranks are
compared where the image is not black: there IG is 0 for any model, which would count as agreement.)

The dense maps of clean images are computed once per process (the memo) and reused by every cell.
Methods (``drift.method``): integrated_gradients (with completeness doubling as in the
``attribution`` evaluator), saliency, smoothgrad (NoiseTunnel over Saliency), gradient_shap.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.core import cost
from robustsweep.core.guards import check_unit_range, frozen
from robustsweep.core.params import check, number_in, positive_int
from robustsweep.core.progress import heartbeat
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate import CellShape, EvalContext, Evaluator, Outcome, WorkItems, register_evaluator
from robustsweep.steps.evaluate.attribution import ig_maps

log = logging.getLogger(__name__)

PAIRED = ("drift_spearman", "drift_topk", "drift_cosine", "drift_hf_delta")  # compressed vs dense
SINGLE = ("ig_hf_share", "ig_gini")  # properties of the compressed model's maps
METHODS = ("integrated_gradients", "saliency", "smoothgrad", "gradient_shap")


# ----------------------------------------------------------------------------------- metrics
def _flat_abs(maps: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H*W): |attribution| summed over channels."""
    return np.abs(maps).sum(1).reshape(len(maps), -1)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Spearman rank correlation of |a| and |b| (channel-summed), ties averaged."""
    from scipy.stats import rankdata

    ra, rb = rankdata(_flat_abs(a), axis=1), rankdata(_flat_abs(b), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), np.nan)


def spearman_on(a: np.ndarray, b: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Per-image Spearman of |a| and |b| over the pixels where ``support`` (N, H, W) is true."""
    fa, fb, sup = _flat_abs(a), _flat_abs(b), support.reshape(len(support), -1)
    out = np.full(len(fa), np.nan)
    for i in range(len(fa)):
        if sup[i].sum() > 2:
            out[i] = spearman(fa[i][sup[i]][None, None, None], fb[i][sup[i]][None, None, None])[0]
    return out


def topk_overlap(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """Per-image share of the top ``fraction`` pixels by |attribution| that the two maps share."""
    fa, fb = _flat_abs(a), _flat_abs(b)
    k = max(1, round(fraction * fa.shape[1]))
    ta, tb = np.argsort(-fa, axis=1, kind="stable")[:, :k], np.argsort(-fb, axis=1, kind="stable")[:, :k]
    return np.array([len(np.intersect1d(x, y)) / k for x, y in zip(ta, tb, strict=True)])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity of the signed maps (all channels)."""
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    den = np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1)
    return np.where(den > 0, (fa * fb).sum(1) / np.where(den > 0, den, 1), np.nan)


def hf_share(maps: np.ndarray) -> np.ndarray:
    """Per-image share of spectral energy above half the Nyquist radius (0.25 cycles/pixel).

    2-D FFT power of each channel, summed over channels; radius sqrt(fx^2 + fy^2) in cycles per
    pixel (Nyquist = 0.5). A checkerboard's energy sits at radius 0.71 (share ~1), a smooth blob's
    near 0 (share ~0)."""
    n, _, h, w = maps.shape
    power = (np.abs(np.fft.fft2(maps, axes=(2, 3))) ** 2).sum(1)  # (N, H, W)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    high = np.sqrt(fx ** 2 + fy ** 2) > 0.25
    total = power.reshape(n, -1).sum(1)
    return np.where(total > 0, power[:, high].sum(1) / np.where(total > 0, total, 1), np.nan)


def gini(maps: np.ndarray) -> np.ndarray:
    """Per-image Gini coefficient of |attribution| over all entries (0 uniform, -> 1 one entry)."""
    x = np.sort(np.abs(maps.reshape(len(maps), -1)), axis=1)
    m = x.shape[1]
    total = x.sum(1)
    idx = np.arange(1, m + 1)
    g = ((2 * idx - m - 1) * x).sum(1) / (m * np.where(total > 0, total, 1))
    return np.where(total > 0, g, np.nan)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (NaNs dropped) and its percentile-bootstrap interval over images."""
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


# ------------------------------------------------------------------------------ attribution
def attribute(model: nn.Module, x: torch.Tensor, y: torch.Tensor, node: DictConfig,
              seed: int) -> np.ndarray:
    """Attribution maps (N, C, H, W) of the true-label logit for ``x`` (float, [0, 1])."""
    import captum.attr as ca

    check_unit_range(x, "drift inputs")
    torch.manual_seed(seed)  # SmoothGrad's noise, GradientSHAP's baselines
    base = torch.zeros_like(x)  # black
    bs = int(node.internal_batch_size)
    with frozen(model), heartbeat(f"drift: {node.method} maps of {len(x)} images"):
        if node.method == "integrated_gradients":
            return ig_maps(model, x, y, int(node.n_steps), int(node.get("max_n_steps") or node.n_steps), bs)
        out = []
        for i in range(0, len(x), bs):
            xb, yb = x[i:i + bs].clone().requires_grad_(True), y[i:i + bs]
            if node.method == "saliency":
                a = ca.Saliency(model).attribute(xb, target=yb, abs=False)
            elif node.method == "smoothgrad":
                a = ca.NoiseTunnel(ca.Saliency(model)).attribute(
                    xb, target=yb, nt_type="smoothgrad", nt_samples=int(node.nt_samples),
                    stdevs=float(node.stdevs), abs=False)
            else:  # gradient_shap: baselines = black and white images
                a = ca.GradientShap(model).attribute(
                    xb, baselines=torch.cat([base[:1], torch.ones_like(base[:1])]), target=yb,
                    n_samples=int(node.n_samples), stdevs=float(node.stdevs))
            out.append(a.detach())
        return torch.cat(out).cpu().numpy()


def support(x: torch.Tensor) -> np.ndarray:
    """(N, H, W): pixels that differ from the black baseline. Outside them IG (and gradient x input)
    is 0 for every model, so ranks there would agree whatever the weights: the randomisation
    check compares ranks inside only (on digits, ~half the pixels are exactly black)."""
    return (x.abs().sum(1) > 0).cpu().numpy()


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameterised layer re-initialised (buffers such as the
    normalisation's mean/std and BatchNorm statistics kept): Adebayo et al.'s cascade, all at once."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed + 1)
    for m in twin.modules():
        if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    return twin.eval()


# ----------------------------------------------------------------------------------- evaluator
def _summaries(values: dict[str, np.ndarray], suffix: str, node: DictConfig, seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, v in values.items():
        mean, lo, hi = bootstrap_ci(v, int(node.n_boot), 0.95, seed)
        out.update({f"{name}{suffix}": mean, f"{name}{suffix}_lo": lo, f"{name}{suffix}_hi": hi})
    return out


def _compare(comp: np.ndarray, dense: np.ndarray, node: DictConfig) -> dict[str, np.ndarray]:
    hf = hf_share(comp)
    return {"drift_spearman": spearman(comp, dense), "drift_topk": topk_overlap(comp, dense, float(node.topk)),
            "drift_cosine": cosine(comp, dense), "ig_hf_share": hf, "ig_gini": gini(comp),
            # paired over the same images: does compression move the share, beyond the noise?
            "drift_hf_delta": hf - hf_share(dense)}


def run(ctx: EvalContext) -> Outcome:
    cfg, ds, node = ctx.cfg, ctx.ds, ctx.cfg.drift
    t0 = time.perf_counter()
    n = min(int(node.n_images), len(ds.eval_idx))
    idx = ds.eval_idx[:n]  # the same images in every cell of a sweep
    x, y = to_float(ds.x_test[idx]), ds.y_test[idx]
    x_adv = ctx.results["robust"].adversarial(ctx, torch.arange(n))
    spec = OmegaConf.to_container(node, resolve=True)
    comp, comp_adv = (attribute(ctx.model, v, y, node, cfg.seed) for v in (x, x_adv))
    # The dense model's clean maps do not depend on the cell: once per process.
    key = (spec, idx.tolist())
    dense_model = ctx.dense()  # from the baseline cache (or the user's checkpoint)
    dense = ctx.dense_memo.get("drift_dense", *key)
    if dense is None:
        dense = attribute(dense_model, x, y, node, cfg.seed)
        ctx.dense_memo.put("drift_dense", dense, *key)
    dense_adv = attribute(dense_model, x_adv, y, node, cfg.seed)  # the cell's adversarial images

    clean, adv = _compare(comp, dense, node), _compare(comp_adv, dense_adv, node)
    metrics = {**_summaries(clean, "", node, cfg.seed), **_summaries(adv, "_adv", node, cfg.seed)}
    metrics["ig_hf_share_dense"] = float(np.nanmean(hf_share(dense)))
    # Adebayo et al.: maps of a re-initialised model must not look like the trained model's.
    k = min(int(node.n_random), n)
    rand = attribute(randomized(ctx.model, cfg.seed), x[:k], y[:k], node, cfg.seed)
    metrics["drift_random_spearman"] = float(np.nanmean(spearman_on(comp[:k], rand, support(x[:k]))))
    metrics.update(drift_n_images=float(n), drift_s=time.perf_counter() - t0)
    reasons = set()
    if metrics["drift_random_spearman"] >= float(node.random_max_spearman):
        reasons.add("attribution_insensitive")
        log.warning("attribution sanity: maps of a re-initialised model correlate %.3f (>= %.2f) with "
                    "the trained model's: they show the input, not the model",
                    metrics["drift_random_spearman"], node.random_max_spearman)
    out = ctx.stage / "drift"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "drift.npz", indices=idx.cpu().numpy(),
                        **clean, **{f"{k}_adv": v for k, v in adv.items()},
                        ig_hf_share_dense=hf_share(dense))
    log.info("drift (%s, %d images): spearman %.3f [%.3f, %.3f], hf share %.3f (dense %.3f)",
             node.method, n, metrics["drift_spearman"], metrics["drift_spearman_lo"],
             metrics["drift_spearman_hi"], metrics["ig_hf_share"], metrics["ig_hf_share_dense"])
    return Outcome(metrics, reasons)


def _check(cfg: DictConfig) -> None:
    node = cfg.drift
    if node.get("name", "none") == "none":
        return
    check(node.get("method") in METHODS, "drift.method", node.get("method"), ", ".join(METHODS))
    for key in ("n_images", "n_boot", "n_random", "internal_batch_size"):
        positive_int(cfg.drift, key)
    number_in(cfg.drift, "topk", 0.0, 1.0, "a share of pixels in (0, 1]", low_open=True)
    number_in(cfg.drift, "random_max_spearman", -1.0, 1.0, "a rank correlation in [-1, 1]")
    if node.method == "integrated_gradients":
        positive_int(cfg.drift, "n_steps")
        cap = node.get("max_n_steps")
        check(cap is None or (isinstance(cap, int) and cap >= node.n_steps), "drift.max_n_steps", cap,
              f"null or an integer >= drift.n_steps ({node.n_steps})")
    if node.method in ("smoothgrad", "gradient_shap"):
        number_in(cfg.drift, "stdevs", 0.0, 1.0, "a noise standard deviation in [0, 1] (pixels)")
        positive_int(cfg.drift, "nt_samples" if node.method == "smoothgrad" else "drift.n_samples")


_METRICS = tuple(f"{m}{s}{b}" for s in ("", "_adv") for m in (*PAIRED, *SINGLE) for b in ("", "_lo", "_hi"))
def _work(cfg: DictConfig, cell: CellShape) -> WorkItems:
    """Per cell: the compressed model's clean and adversarial maps, the dense model's adversarial
    ones and the re-initialised model's; the dense model's clean maps once per process."""
    node = cfg.drift
    n, k = min(int(node.n_images), cell.n_eval), min(int(node.n_random), cell.n_eval)
    if node.method == "integrated_gradients":
        per = cost.doubling(int(node.n_steps), node.get("max_n_steps"))
    else:  # saliency: one gradient; the noisy methods: one per sample
        per = cost.grad_range(int(node.get("nt_samples") or node.get("n_samples") or 1))
    return [(None, per * (3 * n + k)), (("drift_dense", cell.dense), per * n)]


register_evaluator(Evaluator(
    name="drift", group="drift", run=run, work=_work, reads=("robust",), check=_check,
    metrics=(*_METRICS, "ig_hf_share_dense", "drift_random_spearman", "drift_n_images", "drift_s"),
    reasons={"attribution_insensitive": "attribution maps of a re-initialised model correlate with "
                                        "the trained model's (Adebayo et al. 2018): they show the "
                                        "input, not the model"},
    adversarial_of=lambda ctx: torch.arange(min(int(ctx.cfg.drift.n_images), len(ctx.ds.eval_idx))),
))
