"""Paired statistics against references: scipy's exact binomial test (McNemar) and the plain
formula for a paired difference; outcomes.csv compared cell against cell."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from robustsweep.core.stats import mcnemar, paired_bootstrap
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
    assert out["clean_acc_diff"] == pytest.approx(1 / 6) and out["robust_acc_diff"] == pytest.approx(-1 / 6)
    assert out["n_common"] == 4 and out["asr_diff_common"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different images"):
        compare(a, {**b, "index": idx + 1})
