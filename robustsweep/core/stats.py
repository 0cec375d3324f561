"""Paired statistics over evaluation images: every cell of a sweep sees the same images, so two
cells are compared image by image, not as two independent proportions.

* ``mcnemar``: exact two-sided McNemar test (McNemar 1947) on the discordant pairs -- images one
  cell gets right and the other wrong. Under "no difference" each discordant image is a fair coin.
* ``paired_bootstrap``: the difference of two per-image means (e.g. robust accuracy) with a 95 %
  percentile interval from resampling images (Efron & Tibshirani 1993), the same indices for both.
"""

from __future__ import annotations

import math

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


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its percentile interval, resampling the images (same indices for
    both). ``a``, ``b``: per-image values (0/1 outcomes or any number) on the same images."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: needs two 1-D arrays over the same images, got {a.shape}, "
                         f"{b.shape}")
    rng = np.random.default_rng(seed)
    # in chunks of resamples (the same stream as one draw): 2000 x 10,000 indices would be 160 MB
    chunk = max(1, 2_000_000 // len(a))
    diffs = np.concatenate([_diffs(a, b, rng.integers(0, len(a), (min(chunk, n_boot - i), len(a))))
                            for i in range(0, n_boot, chunk)])
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float(b.mean() - a.mean()), float(lo), float(hi)
