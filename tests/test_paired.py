"""Issue 29: every cell against its uncompressed reference on the same images (the ``paired``
evaluator), by hand and end to end."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch

from robustsweep.core.stats import mcnemar
from robustsweep.pipeline import run
from robustsweep.steps.evaluate.paired import Reference, compare


def test_compare_by_hand():
    """Six images, labels 0: the reference gets 0-3 right and keeps 0-1 under attack; the cell gets
    1-4 right and keeps none."""
    y = np.zeros(6, dtype=np.int64)
    ref = Reference(torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 1]))
    cell = Reference(torch.tensor([1, 0, 0, 0, 0, 1]), torch.tensor([1, 1, 1, 1, 1, 1]))
    m = compare(y, cell, ref, n_boot=200)
    assert m["ref_clean_acc"] == pytest.approx(4 / 6) and m["ref_robust_acc"] == pytest.approx(2 / 6)
    assert m["delta_clean_acc"] == pytest.approx(0.0)
    assert m["delta_robust_acc"] == pytest.approx(0 - 2 / 6)
    assert m["ref_asr"] == pytest.approx(0.5)
    assert m["n_common"] == 3  # images 1, 2, 3
    assert m["asr_common"] == pytest.approx(1.0) and m["asr_common_ref"] == pytest.approx(2 / 3)
    assert m["delta_asr_common"] == pytest.approx(1 / 3)
    assert m["delta_asr_common_lo"] <= m["delta_asr_common"] <= m["delta_asr_common_hi"]
    assert m["delta_clean_acc_mcnemar_p"] == pytest.approx(
        mcnemar(np.array([1, 1, 1, 1, 0, 0], bool), np.array([0, 1, 1, 1, 1, 0], bool)))


def test_compare_without_common_images_gives_nan_not_zero():
    y = np.zeros(2, dtype=np.int64)
    m = compare(y, Reference(torch.tensor([1, 0]), torch.tensor([1, 0])),
                Reference(torch.tensor([0, 1]), torch.tensor([0, 1])), n_boot=50)
    assert m["n_common"] == 0 and np.isnan(m["delta_asr_common"]) and np.isnan(m["asr_common"])


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_cell_is_compared_with_the_dense_model_in_any_order(make_cfg, tmp_path, caplog):
    """The compressed cell first: it attacks the dense model itself; the dense cell, run after it,
    finds the same outcome in the cache and logs differences of exactly 0; both agree with the
    dense cell's own levels."""
    caplog.set_level(logging.INFO)
    pruned = run(make_cfg("sparsity=0.75", "attribution=none"))
    assert "reference: the cell's attack" in caplog.text  # the dense model was attacked for the reference
    dense = run(make_cfg("sparsity=0", "attribution=none"))
    assert pruned["ref_clean_acc"] == pytest.approx(dense["clean_acc"])
    assert pruned["ref_robust_acc"] == pytest.approx(dense["robust_acc"])
    assert pruned["delta_clean_acc"] == pytest.approx(pruned["clean_acc"] - dense["clean_acc"])
    assert pruned["delta_robust_acc"] == pytest.approx(pruned["robust_acc"] - dense["robust_acc"])
    assert pruned["delta_clean_acc_lo"] <= pruned["delta_clean_acc"] <= pruned["delta_clean_acc_hi"]
    assert pruned["delta_clean_acc_hi"] < 0  # 75 % of the digits CNN: a clear clean-accuracy loss
    for k in ("delta_clean_acc", "delta_robust_acc", "delta_asr_common"):
        assert dense[k] == dense[f"{k}_lo"] == dense[f"{k}_hi"] == 0.0
    assert list((tmp_path / "outputs" / "cache" / "reference").glob("*.pt")).__len__() == 1
    # the cell's outcomes.csv carries the reference's predictions on the same rows
    stage = sorted((tmp_path / "outputs" / "mlartifacts").rglob("outcomes.csv"))
    rows = _rows(stage[0])
    assert {"ref_clean_pred", "ref_adv_pred"} <= set(rows[0])


def test_a_new_eps_attacks_the_dense_model_again_and_a_rerun_does_not(make_cfg, caplog):
    caplog.set_level(logging.INFO)
    run(make_cfg("sparsity=0.5", "attribution=none", "epsilon=0.05"))
    caplog.clear()
    run(make_cfg("sparsity=0.25", "attribution=none", "epsilon=0.05"))
    assert "reference: the cell's attack" not in caplog.text  # same dense model, attack, eps, images: cached
    run(make_cfg("sparsity=0.25", "attribution=none", "epsilon=0.2"))
    assert "reference: the cell's attack" in caplog.text
