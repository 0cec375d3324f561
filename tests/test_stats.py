"""Paired statistics against references: scipy's exact binomial test (McNemar) and the plain
formula for a paired difference; outcomes.csv compared cell against cell."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from robustsweep.core.stats import mcnemar, paired_bootstrap, replicate_interval
from robustsweep.tracking.outcomes import compare


@pytest.mark.parametrize("b,c", [(0, 0), (3, 9), (10, 10), (1, 30), (40, 25), (700, 800), (2, 4300)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(b, c):
    a_ok = np.array([True] * b + [False] * c + [True] * 50 + [False] * 7)
    b_ok = np.array([False] * b + [True] * c + [True] * 50 + [False] * 7)
    ref = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert mcnemar(a_ok, b_ok) == pytest.approx(ref, rel=1e-9)


def test_paired_bootstrap_is_narrower_than_unpaired_for_correlated_outcomes():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.6
    b = a.copy()
    b[rng.choice(500, 20, replace=False)] ^= True  # 20 images differ
    d, lo, hi = paired_bootstrap(a, b)
    assert d == pytest.approx(b.mean() - a.mean()) and lo <= d <= hi
    unpaired_half = 1.96 * np.sqrt(a.mean() * (1 - a.mean()) / 500 + b.mean() * (1 - b.mean()) / 500)
    assert (hi - lo) / 2 < unpaired_half / 2  # pairing removes the shared image-to-image variance


def test_compare_refuses_different_images_and_reports_paired_differences():
    idx = np.arange(6)
    lab = np.zeros(6, int)
    a = {"index": idx, "clean_ok": np.array([1, 1, 1, 1, 0, 0], bool),
         "adv_ok": np.array([1, 1, 0, 0, 0, 0], bool)}
    b = {"index": idx, "clean_ok": np.array([1, 1, 1, 1, 1, 0], bool),
         "adv_ok": np.array([1, 0, 0, 0, 0, 0], bool)}
    out = compare({**a, "label": lab}, {**b, "label": lab}, n_boot=200)
    assert out["delta_clean_acc"] == pytest.approx(1 / 6) and out["delta_robust_acc"] == pytest.approx(-1 / 6)
    assert out["n_common"] == 4 and out["delta_asr_common"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different images"):
        compare(a, {**b, "index": idx + 1})


def _study(rng: np.random.Generator, n_seeds: int, tau: float, n_images: int = 300,
           p: float = 0.5, d: float = 0.1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One simulated study: per seed, a reference and a cell on the same images whose true
    difference is ``d`` plus a seed effect N(0, tau^2) (training variance)."""
    a, b = [], []
    for _ in range(n_seeds):
        u = rng.random(n_images)
        a.append((u < p).astype(float))
        b.append((u < p + d + rng.normal(0, tau)).astype(float))
    return a, b


@pytest.mark.parametrize("tau", [0.0, 0.03])
def test_replicate_interval_covers_the_true_difference(tau):
    """Issue 29: across 200 simulated studies (3 seeds x 300 images, true difference 0.10), the 95 %
    interval covers it in >= 90 % of them, with and without seed-to-seed variance."""
    rng = np.random.default_rng(7)
    hits = 0
    for k in range(200):
        a, b = _study(rng, 3, tau)
        _, lo, hi = replicate_interval(a, b, n_boot=300, seed=k)
        hits += lo <= 0.1 <= hi
    assert hits >= 180, f"covered {hits} of 200"


def test_replicate_interval_is_wider_than_images_only_when_seeds_differ():
    rng = np.random.default_rng(3)
    a, b = _study(rng, 3, tau=0.05, n_images=1000)
    _, lo, hi = replicate_interval(a, b, n_boot=500)
    _, ilo, ihi = paired_bootstrap(np.concatenate(a), np.concatenate(b), n_boot=500)
    assert hi - lo > 1.5 * (ihi - ilo)
    # one seed is the images-only paired bootstrap itself
    assert replicate_interval(a[:1], b[:1], n_boot=200) == paired_bootstrap(a[0], b[0], n_boot=200)


def test_replicate_interval_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same number"):
        replicate_interval([np.ones(3)], [])
    with pytest.raises(ValueError, match="same images"):
        replicate_interval([np.ones(3)], [np.ones(4)])
