"""Attribution drift: metrics with known answers, the randomisation sanity check, and the evaluator
end to end (dense maps computed once per process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robustsweep.pipeline import run
from robustsweep.steps.evaluate.drift import (
    attribute,
    bootstrap_ci,
    cosine,
    gini,
    hf_share,
    randomized,
    spearman,
    spearman_on,
    support,
    topk_overlap,
)
from robustsweep.steps.models import Normalized
from robustsweep.tracking import reuse

RNG = np.random.default_rng(0)


def test_identical_maps_correlate_and_overlap_fully():
    a = RNG.normal(size=(5, 3, 16, 16))
    assert np.allclose(spearman(a, a), 1) and np.allclose(topk_overlap(a, a, 0.1), 1)
    assert np.allclose(cosine(a, a), 1) and np.allclose(cosine(a, -a), -1)
    b = RNG.normal(size=(5, 3, 16, 16))  # independent maps: near 0
    assert np.abs(spearman(a, b)).max() < 0.25 and topk_overlap(a, b, 0.1).mean() < 0.3


def test_high_frequency_share_of_a_checkerboard_and_a_smooth_blob():
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1.0)[None, None].repeat(3, 1)
    blob = np.exp(-((i - 16) ** 2 + (j - 16) ** 2) / (2 * 6.0 ** 2))[None, None]
    assert hf_share(checker)[0] > 0.99
    assert hf_share(blob)[0] < 0.01


def test_gini_of_uniform_and_one_hot_maps():
    assert gini(np.ones((1, 1, 8, 8)))[0] == pytest.approx(0, abs=1e-12)
    one = np.zeros((1, 1, 8, 8))
    one[0, 0, 3, 3] = 5
    assert gini(one)[0] == pytest.approx(1 - 1 / 64)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_images():
    small, large = RNG.normal(0.3, 0.2, 20), RNG.normal(0.3, 0.2, 2000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi
    _, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5 and lo2 < 0.3 < hi2


class InputOnly(nn.Module):
    """logit_k = w_k * sum(x): its IG for class k is x * w_k, so |IG| ranks the pixels of the
    input whatever the weights are. Maps that show the input, not the model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x.sum((1, 2, 3))[:, None])


NODE = OmegaConf.create({"method": "integrated_gradients", "n_steps": 16, "max_n_steps": 16,
                         "internal_batch_size": 64})


def test_randomisation_check_fires_on_an_input_only_model_and_passes_on_a_trained_one(digits_model):
    model, ds, _ = digits_model
    x = ds.x_eval[:16].float() / 255
    y = ds.y_eval[:16]
    sup = support(x)
    trained = attribute(model, x, y, NODE, seed=0)
    assert np.nanmean(spearman_on(trained, attribute(randomized(model, 0), x, y, NODE, seed=0), sup)) < 0.5
    torch.manual_seed(0)
    fake = InputOnly().eval()
    own = attribute(fake, x, y, NODE, seed=0)
    assert np.nanmean(spearman_on(own, attribute(randomized(fake, 0), x, y, NODE, seed=0), sup)) > 0.99


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "gradient_shap"])
def test_other_captum_methods_give_maps_of_the_input_shape(digits_model, method):
    model, ds, _ = digits_model
    node = OmegaConf.create({"method": method, "internal_batch_size": 8, "nt_samples": 4,
                             "n_samples": 4, "stdevs": 0.1})
    x, y = ds.x_eval[:6].float() / 255, ds.y_eval[:6]
    maps = attribute(model, x, y, node, seed=0)
    assert maps.shape == tuple(x.shape) and np.isfinite(maps).all() and np.abs(maps).sum() > 0


def test_drift_evaluator_end_to_end_with_dense_maps_reused(make_cfg):
    over = ("drift=ig", "drift.n_images=40", "drift.n_steps=8", "drift.max_n_steps=8", "drift.n_boot=200",
            "attribution=none", "epsilon=0.1")
    dense = run(make_cfg("sparsity=0", *over))
    # sparsity 0: the compressed model is the dense one, so the maps agree exactly
    assert dense["drift_spearman"] == pytest.approx(1) and dense["drift_topk"] == pytest.approx(1)
    assert dense["ig_hf_share"] == pytest.approx(dense["ig_hf_share_dense"])
    hits = reuse.DRIFT_DENSE.hits
    pruned = run(make_cfg("sparsity=0.5", *over))
    assert reuse.DRIFT_DENSE.hits == hits + 1  # the dense maps came from the memo
    assert dense["drift_hf_delta"] == 0 and dense["drift_hf_delta_lo"] == dense["drift_hf_delta_hi"] == 0
    for k in ("drift_spearman", "drift_topk", "drift_cosine", "ig_hf_share", "ig_gini", "drift_hf_delta"):
        for s in ("", "_adv"):
            m, lo, hi = pruned[k + s], pruned[k + s + "_lo"], pruned[k + s + "_hi"]
            assert lo <= m <= hi, (k, s)
    assert pruned["drift_spearman"] < 0.99 and pruned["drift_n_images"] == 40
    assert pruned["drift_random_spearman"] < 0.5  # a trained model passes the sanity check


def test_drift_bad_values_are_refused(make_cfg):
    from robustsweep.config import ConfigError, validate

    for over, key in ((["drift=ig", "drift.method=deepdream"], "drift.method"),
                      (["drift=ig", "drift.topk=0"], "drift.topk"),
                      (["drift=ig", "drift.n_images=0"], "drift.n_images")):
        with pytest.raises(ConfigError, match=key):
            validate(make_cfg(*over))


def test_normalised_wrapper_is_what_gets_attributed(digits_model):
    model, _, _ = digits_model
    assert isinstance(model, Normalized)  # maps are in pixel space, like eps
