"""The study-cost estimate (robustsweep.estimate, robustsweep.core.cost): what it counts, checked with
fixed rates (the calibration itself is timed on the machine, so only its shape is checked here)."""

from __future__ import annotations

import pytest

from robustsweep import estimate as est_mod
from robustsweep.config import compose, validate
from robustsweep.core.cost import Rates, Work, doubling, duration, fwd_range, grad_range, span
from robustsweep.steps.attacks import ATTACKS
from tests.conftest import isolated_overrides

RATES = Rates(fwd=1000.0, grad=100.0, train=50.0)  # images/s


def test_work_adds_scales_and_chains_ranges():
    pgd = grad_range(1, 10)
    assert (pgd * 3).grad == 3 and (pgd * 3).hi().grad == 30
    assert (pgd + Work(fwd=2)).hi() == Work(fwd=2, grad=10)
    # a second attack on what the first leaves: nothing of it at the least, all of it at the most
    chained = grad_range(5).then(fwd_range(0, 100))
    assert (chained.grad, chained.fwd) == (5, 0) and chained.hi() == Work(fwd=100, grad=5)
    assert doubling(64, 512) == grad_range(64, 64 + 128 + 256 + 512) and doubling(32, None) == grad_range(32)
    assert RATES.seconds(Work(fwd=1000, grad=100, train=50, seconds=1) + grad_range(0, 100)) == (4.0, 5.0)
    assert duration(42) == "42 s" and duration(600) == "10.0 min" and duration(7200) == "2.0 h"
    assert span(600, 601) == "~10.0 min" and span(60, 7200) == "~60 s (up to 2.0 h)"


def test_attacks_declare_their_work_per_image():
    def work(*overrides: str) -> Work:
        return ATTACKS.work(compose(list(overrides)).attack)

    assert work("attack=fgsm") == grad_range(1)
    assert work("attack=pgd", "attack.steps=20", "attack.early_stop=false") == grad_range(20)
    assert work("attack=pgd", "attack.steps=20", "attack.early_stop=true") == grad_range(1, 20)
    aa = work("attack=autoattack")  # PGD-10 prefilter, then APGD-CE 100, APGD-T and FAB-T 9 x 100, Square
    assert aa.grad == 1 and aa.hi().grad == 10 + 100 + 900 + 1800 and aa.hi().fwd == 5000
    assert work("attack=autoattack", "attack.prefilter=none").grad == 100  # APGD-CE runs on every image
    assert work("attack=mifgsm") is None  # a torchattacks class by _target_ declares nothing


@pytest.fixture
def fixed_rates(monkeypatch):
    monkeypatch.setattr(est_mod, "calibrate", lambda *a, **k: RATES)


def _cells(tmp_path, *grid: tuple[str, ...], extra: tuple[str, ...] = ()) -> list:
    import itertools

    return [validate(compose([*isolated_overrides(tmp_path), "experiment=quickstart", *extra, *combo]))
            for combo in itertools.product(*grid)]


def test_baselines_are_counted_once_and_not_when_cached(tmp_path, fixed_rates):
    cells = _cells(tmp_path, ("sparsity=0", "sparsity=0.5"), ("epsilon=0.1", "epsilon=0.2"))
    e = est_mod.estimate(cells)
    (train,) = e.train  # four cells, one baseline
    assert train[1] == "30 epochs x 1438 images, clean"
    assert train[2] == pytest.approx(30 * 1438 / 50 + 359 / 1000)
    assert e.n_cached == 0 and "1 to train" in "\n".join(e.lines())
    from robustsweep.steps.train import baseline_key

    cache = tmp_path / "outputs" / "cache" / "baselines"
    cache.mkdir(parents=True)
    (cache / f"small_cnn-{baseline_key(cells[0])}.safetensors").write_bytes(b"")
    e = est_mod.estimate(cells)
    assert e.train == [] and e.n_cached == 1
    # an adversarially trained baseline costs its inner attack too
    pgd_at = est_mod.estimate(_cells(tmp_path, ("sparsity=0.5",), extra=("objective=pgd_at",)))
    assert pgd_at.train[0][2] > 3 * train[2]


def test_work_shared_by_a_model_is_counted_once(tmp_path, fixed_rates):
    """FGSM's direction, the clean predictions and the clean IG maps are one model's, the dense
    reference of an attack and eps every model's: more eps values or models add only what is theirs."""
    one = est_mod.estimate(_cells(tmp_path, ("sparsity=0.5",), ("epsilon=0.1",)))
    three = est_mod.estimate(_cells(tmp_path, ("sparsity=0.5",), ("epsilon=0.1", "epsilon=0.2", "epsilon=0.3")))
    two_models = est_mod.estimate(_cells(tmp_path, ("sparsity=0.25", "sparsity=0.5"), ("epsilon=0.1",)))
    per_cell = three.cells[0] - one.cells[0]
    assert 0 < per_cell / 2 < 0.75 * one.cells[0] and one.cells[0] < two_models.cells[0] < 1.9 * one.cells[0]
    # parallel workers each compute what they share
    par = est_mod.estimate(_cells(tmp_path, ("sparsity=0.5",), ("epsilon=0.1", "epsilon=0.2")), at_once=2,
                           worker_starts=2)
    seq = est_mod.estimate(_cells(tmp_path, ("sparsity=0.5",), ("epsilon=0.1", "epsilon=0.2")))
    assert par.cells[0] > seq.cells[0] and par.fixed_s > seq.fixed_s - 2 * est_mod.CELL_S


def test_what_declares_no_work_is_named(tmp_path, fixed_rates):
    e = est_mod.estimate(_cells(tmp_path, ("attack=mifgsm",), extra=("certify=ibp",)))
    assert {"certify", "robust with attack=mifgsm"} <= e.not_estimated
    assert "not estimated: " in e.lines()[-1]


def test_calibration_measures_three_positive_rates():
    import torch

    from robustsweep.steps.models import small_cnn

    r = est_mod.calibrate(small_cnn(1, 10, 8), (1, 8, 8), 10, torch.device("cpu"), 32, 32)
    # positive and finite (which is faster is not asserted: on a busy machine any order happens)
    assert all(0 < v < float("inf") for v in (r.fwd, r.grad, r.train)), r


def test_every_builtin_attack_and_objective_declares_its_work():
    """A new attack or objective registered without ``work=`` would make every sweep that uses it
    say "not estimated": caught here instead."""
    from robustsweep.steps.evaluate import evaluators
    from robustsweep.steps.train import OBJECTIVES

    for registry in (ATTACKS, OBJECTIVES):
        assert set(registry) == set(registry.works), set(registry) - set(registry.works)
    # the evaluators that do not (yet): the certificates, the minimum-norm search, quantization's agreement
    assert {ev.name for ev in evaluators() if ev.work is None} == {"certify", "min_norm", "quant"}
