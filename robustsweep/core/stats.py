"""Paired statistics over evaluation images: every cell of a sweep sees the same images, so two
cells are compared image by image, not as two independent proportions.

* ``mcnemar``: exact two-sided McNemar test (McNemar 1947) on the discordant pairs -- images one
  cell gets right and the other wrong. Under "no difference" each discordant image is a fair coin.
* ``paired_bootstrap``: the difference of two per-image means (e.g. robust accuracy) with a 95 %
  percentile interval from resampling images (Efron & Tibshirani 1993), the same indices for both.
* ``replicate_interval``: the same over replicates (cells that differ only in ``seed``: each its own
  baseline, subset draw and attack starts): the mean of the per-seed differences, with an interval
  that covers training variance as well as the choice of images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mcnemar(a_ok: np.ndarray, b_ok: np.ndarray) -> float:
    """Exact two-sided p-value that per-image outcomes ``a_ok`` and ``b_ok`` (bool, same images)
    come from the same accuracy: 2 * P(Binomial(n_discordant, 1/2) <= min(b, c)), capped at 1."""
    a_ok, b_ok = np.asarray(a_ok, bool), np.asarray(b_ok, bool)
    if a_ok.shape != b_ok.shape:
        raise ValueError(f"mcnemar: outcomes of {a_ok.shape} and {b_ok.shape} images; the same images "
                         f"are needed")
    b, c = int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # exact integers: 2.0**n overflows a float past 1023 discordant images (a 10,000-image test split)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def _diffs(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return b[idx].mean(1) - a[idx].mean(1)


def _resampled_diffs(a: np.ndarray, b: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` image resamples of ``mean(b) - mean(a)``, drawn in chunks (the same stream as one draw):
    2000 x 10,000 indices at once would be 160 MB."""
    chunk = max(1, 2_000_000 // len(a))
    return np.concatenate([_diffs(a, b, rng.integers(0, len(a), (min(chunk, n - i), len(a))))
                           for i in range(0, n, chunk)])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its percentile interval, resampling the images (same indices for
    both). ``a``, ``b``: per-image values (0/1 outcomes or any number) on the same images."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: needs two 1-D arrays over the same images, got {a.shape}, "
                         f"{b.shape}")
    diffs = _resampled_diffs(a, b, n_boot, np.random.default_rng(seed))
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float(b.mean() - a.mean()), float(lo), float(hi)


def replicate_interval(a: Sequence[np.ndarray], b: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """The mean over seeds of ``mean(b_s) - mean(a_s)`` and its interval; ``a[s]``, ``b[s]``: per-image
    values of seed ``s`` (paired within a seed; seeds may have different images).

    One seed: ``paired_bootstrap`` over its images. Several: a hierarchical bootstrap (draw seeds with
    replacement, then images within each drawn seed; Davison & Hinkley 1997, sec. 3.8), widened to
    the Student-t interval over the per-seed differences where that is wider. Why both: with the 3-5
    seeds a study can afford, the bootstrap over seeds sees only 3-5 values and understates between-
    seed variance ((n-1)/n, discrete support): in simulation (tests/test_stats.py) it covered the true
    difference 84 % of the time with 3 seeds and seed variance, the t interval 94 %."""
    if len(a) != len(b) or not a:
        raise ValueError(f"replicate_interval: needs the same number (>= 1) of seeds on both sides, got "
                         f"{len(a)} and {len(b)}")
    pairs = [(np.asarray(x, float), np.asarray(y, float)) for x, y in zip(a, b, strict=True)]
    for x, y in pairs:
        if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
            raise ValueError(f"replicate_interval: each seed needs two 1-D arrays over the same images, got "
                             f"{x.shape} and {y.shape}")
    if len(pairs) == 1:
        return paired_bootstrap(*pairs[0], n_boot=n_boot, seed=seed, level=level)
    rng = np.random.default_rng(seed)
    n_seeds = len(pairs)
    # per seed, n_boot * n_seeds image resamples: a seed drawn twice in one replicate gets two
    # independent image resamples (slot j of resample k uses column k * n_seeds + j)
    draws = np.stack([_resampled_diffs(x, y, n_boot * n_seeds, rng) for x, y in pairs])
    which = rng.integers(0, n_seeds, (n_boot, n_seeds))
    cols = np.arange(n_boot * n_seeds).reshape(n_boot, n_seeds)
    boot = draws[which, cols].mean(1)
    per_seed = np.array([y.mean() - x.mean() for x, y in pairs])
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    from scipy.stats import t as student_t  # here, not at import: scipy.stats costs ~1.7 s per process

    half = student_t.ppf(0.5 + level / 2, n_seeds - 1) * per_seed.std(ddof=1) / math.sqrt(n_seeds)
    mid = float(per_seed.mean())
    # the t interval of 2-3 seeds can overshoot what a difference of means can be ([-1, 1] for 0/1)
    floor = min(float(y.min() - x.max()) for x, y in pairs)
    ceiling = max(float(y.max() - x.min()) for x, y in pairs)
    return mid, float(max(min(lo, mid - half), floor)), float(min(max(hi, mid + half), ceiling))


def paired_deltas(ref_clean: np.ndarray, ref_robust: np.ndarray, clean: np.ndarray, robust: np.ndarray,
                  n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """A cell against its reference on the same images, from per-image bools (correct; correct
    under attack): ``delta_clean_acc``, ``delta_robust_acc`` (cell - reference) with 95 % paired-
    bootstrap intervals (``_lo``/``_hi``) and exact McNemar p (``_mcnemar_p``); on the images both
    classify correctly (``n_common``): ``asr_common`` (the cell's), ``asr_common_ref`` and
    ``delta_asr_common`` the same way (NaN when there is no such image); the reference's levels
    ``ref_clean_acc``, ``ref_robust_acc``, ``ref_asr``."""
    r_ok, r_rob, c_ok, c_rob = (np.asarray(v, bool) for v in (ref_clean, ref_robust, clean, robust))
    out: dict[str, float] = {"ref_clean_acc": float(r_ok.mean()), "ref_robust_acc": float(r_rob.mean()),
                             "ref_asr": float((r_ok & ~r_rob).sum() / r_ok.sum()) if r_ok.any() else math.nan}
    for name, a, b in (("delta_clean_acc", r_ok, c_ok), ("delta_robust_acc", r_rob, c_rob)):
        d, lo, hi = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
        out.update({name: d, f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_mcnemar_p": mcnemar(a, b)})
    common = c_ok & r_ok
    out["n_common"] = float(common.sum())
    keys = ("asr_common", "asr_common_ref", "delta_asr_common", "delta_asr_common_lo", "delta_asr_common_hi",
            "delta_asr_common_mcnemar_p")
    if not common.any():  # no image both classify correctly: no ASR to compare (NaN, not 0)
        return {**out, **dict.fromkeys(keys, math.nan)}
    c_fool, r_fool = ~c_rob[common], ~r_rob[common]  # fooled, among the images both get right
    d, lo, hi = paired_bootstrap(r_fool, c_fool, n_boot=n_boot, seed=seed)
    return {**out, **dict(zip(keys, (float(c_fool.mean()), float(r_fool.mean()), d, lo, hi,
                                     mcnemar(~r_fool, ~c_fool)), strict=True))}
