"""What we check on every run (guards, the sanity evaluator, the cross-sweep check): each guard
fails when its fault is present."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robustsweep.core import guards
from robustsweep.core.guards import AttackGuardError, check_adversarial
from robustsweep.steps.attacks import attack_info, build_attack, evaluate
from robustsweep.steps.data import to_float
from robustsweep.steps.evaluate import sanity
from robustsweep.steps.evaluate.attribution import integrated_gradients
from robustsweep.tracking import crosscheck

PGD = OmegaConf.create({"name": "pgd", "steps": 10, "step_size": None, "random_start": True,
                        "batch_size": 128})
FGSM = OmegaConf.create({"name": "fgsm", "batch_size": 128})


class Masked(nn.Module):
    """Gradient masking by logit scaling: softmax saturates, so the loss gradient is exactly 0
    for confidently classified images while predictions are unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e4


class Noisy(nn.Module):
    """A stochastic 'defence': random input noise even in eval mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x + 0.5 * torch.randn_like(x)).clamp(0, 1))


def _probe(model, ds, eps=0.1, attack=PGD, n=64, build=None):
    with torch.no_grad():
        pred = model(to_float(ds.x_eval)).argmax(1)
    idx = (pred == ds.y_eval).nonzero().flatten()[:n]
    build = build or (lambda e, o: build_attack(model, e, attack, **o))
    return sanity.sanity_probe(model, build, attack.name, to_float(ds.x_eval[idx]), ds.y_eval[idx],
                               eps, tol=0.05)


@pytest.mark.parametrize("attack", [FGSM, PGD], ids=["fgsm", "pgd"])
def test_sound_model_passes_every_sanity_check(digits_model, attack):
    model, ds, _ = digits_model
    res = _probe(model, ds, attack=attack)
    assert res.reasons == [], res.asr
    assert res.asr["eps0"] == 0 and res.asr["unbounded"] >= 0.99
    assert res.asr["pgd"] >= res.asr["fgsm"] - 0.05 and res.asr["pgd"] >= res.asr["noise"]


def test_gradient_masking_is_flagged(digits_model):
    model, ds, _ = digits_model
    res = _probe(Masked(model).eval(), ds, eps=0.3)
    assert "pgd_below_noise" in res.reasons, res.asr
    assert "unbounded_fails" in res.reasons, res.asr


def test_stochastic_model_is_flagged_at_eps_zero(digits_model):
    model, ds, _ = digits_model
    res = _probe(Noisy(model).eval(), ds, eps=0.1)
    assert "eps0_fools" in res.reasons, res.asr


def test_broken_pgd_is_flagged(digits_model):
    model, ds, _ = digits_model

    def build(eps, o):  # a "PGD" that returns its input: weaker than FGSM and than noise
        return (lambda x, y: x.clone()) if o.get("name") == "pgd" and eps < 1 else \
            build_attack(model, eps, PGD, **o)
    res = _probe(model, ds, eps=0.2, build=build)
    assert {"pgd_below_fgsm", "pgd_below_noise"} <= set(res.reasons), res.asr


def test_eps_monotonicity_flags_only_the_falling_cell():
    def run(rid, eps, asr, **params):
        p = {"epsilon": str(eps), "sparsity": "0.5", "attack.name": "fgsm",
             "paths.output_dir": rid, **params}  # paths differ per run: not part of the identity
        return SimpleNamespace(info=SimpleNamespace(run_id=rid),
                               data=SimpleNamespace(params=p, metrics={"asr": asr}, tags={}))
    runs = [run("a", 0.01, 0.2), run("b", 0.03, 0.5), run("c", 0.05, 0.3), run("d", 0.1, 0.49),
            run("e", 0.2, 0.9),
            run("f", 0.01, 0.9, sparsity="0.9"), run("g", 0.05, 0.1, **{"attack.name": "pgd"})]
    flagged = crosscheck.eps_monotonicity(runs, tol=0.02)
    assert set(flagged) == {"c"}, flagged  # d is within tol of b; f and g are other cells
    assert "0.3000" in flagged["c"] and "0.5000" in flagged["c"]


def test_adversarial_guard_catches_labels_nan_shape_and_l2():
    x = torch.full((2, 1, 4, 4), 0.5)
    y = torch.tensor([1, 2])
    with pytest.raises(AttackGuardError, match="labels"):
        check_adversarial(x, x, 0.1, y_before=y.clone(), y_after=torch.tensor([1, 3]))
    with pytest.raises(AttackGuardError, match="NaN"):
        check_adversarial(x, x * float("nan"), 0.1)
    with pytest.raises(AttackGuardError, match="batch"):
        check_adversarial(x, x[:1], 0.1)
    d = torch.zeros_like(x)
    d[:, 0, 0, :] = 0.1  # L-inf 0.1, L2 0.2 per image
    assert check_adversarial(x, x + d, 0.1) == pytest.approx(0.1)
    with pytest.raises(AttackGuardError, match="L2"):
        check_adversarial(x, x + d, 0.15, norm="L2")
    assert check_adversarial(x, x + d, 0.2, norm="L2") == pytest.approx(0.2)


def test_labels_modified_by_an_attack_stop_the_evaluation(digits_model):
    model, ds, _ = digits_model

    def sneaky(x, y):
        y.fill_(0)  # rewrites the labels it was handed
        return x
    with pytest.raises(AttackGuardError, match="labels"):
        evaluate(model, sneaky, ds.x_eval[:50], ds.y_eval[:50].clone(), 0.1, 50)


def test_normalised_inputs_are_refused_and_unit_floats_accepted(digits_model):
    model, ds, _ = digits_model
    attack = build_attack(model, 0.1, FGSM)
    x = to_float(ds.x_eval[:100])
    normalised = (x - 0.3) / 0.3
    with pytest.raises(guards.InputRangeError, match=r"allowed: pixels in \[0, 1\]"):
        evaluate(model, attack, normalised, ds.y_eval[:100], 0.1, 50)
    with pytest.raises(guards.InputRangeError):
        integrated_gradients(model, normalised[:2], x[:2], ds.y_eval[:2], torch.arange(2), 8, "black", 8)
    a = evaluate(model, attack, x, ds.y_eval[:100], 0.1, 50)
    b = evaluate(model, attack, ds.x_eval[:100], ds.y_eval[:100], 0.1, 50)
    assert (a.n_correct, a.n_fooled) == (b.n_correct, b.n_fooled)
    assert b.n_batches_checked == -(-b.n_correct // 50) and b.max_dist <= 0.1 + 1e-6


def test_model_change_is_detected_even_in_train_mode(digits_model):
    model, _, _ = digits_model
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the model is shared by the session
    model.train()
    try:
        with guards.unchanged(model, "a no-op"):
            pass
        with pytest.raises(guards.ModelChangedError, match="a forward in train mode"), \
                guards.unchanged(model, "a forward in train mode"):
            model(torch.rand(4, 1, 8, 8))  # BatchNorm in train mode updates its running stats
        model.load_state_dict(saved)
        with pytest.raises(guards.ModelChangedError), guards.unchanged(model, "an in-place edit"), \
                torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-3  # one weight, a small change
    finally:
        model.load_state_dict(saved)
        model.eval()


def test_state_hash_sees_every_tensor_kind(digits_model):
    model, _, _ = digits_model
    h = guards.state_hash(model)
    assert h == guards.state_hash(model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.num_batches_tracked += 1  # a 0-dim int64 buffer
    try:
        assert guards.state_hash(model) != h
    finally:
        bn.num_batches_tracked -= 1
    assert guards.state_hash(model) == h


def test_ig_doubles_n_steps_until_complete_and_counts_what_is_not(digits_model):
    model, ds, _ = digits_model
    x, y = to_float(ds.x_eval[:6]), ds.y_eval[:6]
    low, _ = integrated_gradients(model, x, x, y, torch.arange(6), 2, "black", 64)  # no doubling
    assert low.n_steps == 2 and low.n_incomplete > 0
    fixed, _ = integrated_gradients(model, x, x, y, torch.arange(6), 2, "black", 64, max_n_steps=1024)
    assert fixed.n_steps > 2 and fixed.n_incomplete == 0
    with torch.no_grad():
        gap = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    assert (torch.from_numpy(fixed.delta_clean).abs() <= torch.clamp(0.05 * gap.abs(), min=1e-3)).all()


def test_check_sweep_tags_the_falling_cell_in_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = c.create_experiment("x")
    parent = c.create_run(exp).info.run_id
    ids = {}
    for eps, asr in ((0.01, 0.3), (0.03, 0.6), (0.1, 0.4)):
        r = c.create_run(exp, tags={"mlflow.parentRunId": parent})
        c.log_param(r.info.run_id, "epsilon", str(eps))
        c.log_param(r.info.run_id, "sparsity", "0.5")
        c.log_metric(r.info.run_id, "asr", asr)
        c.set_terminated(r.info.run_id, "FINISHED")
        ids[eps] = r.info.run_id
    c.set_tag(ids[0.1], "suspect", "ig_incomplete")  # an earlier reason is kept
    flagged = crosscheck.check_sweep(c, parent, tol=0.05)
    assert set(flagged) == {ids[0.1]}
    assert c.get_run(ids[0.1]).data.tags["suspect"] == "asr_falls_with_eps,ig_incomplete"
    assert "suspect" not in c.get_run(ids[0.03]).data.tags


def test_an_attack_weaker_than_pgd_is_flagged_and_l2_cells_probe_in_l2(digits_model):
    """AutoAttack must fool at least as many probe images as PGD-10 (give or take one): an
    'autoattack' whose own ASR is far below PGD's is tagged weaker_than_pgd; one within an image is
    not. An L2 cell probes with L2 noise and L2 PGD and has no FGSM check."""
    model, ds, _ = digits_model
    with torch.no_grad():
        pred = model(to_float(ds.x_eval)).argmax(1)
    idx = (pred == ds.y_eval).nonzero().flatten()[:64]
    x, y = to_float(ds.x_eval[idx]), ds.y_eval[idx]
    aa = OmegaConf.create({"name": "autoattack", "norm": "linf", "version": "standard", "steps": 10})

    def build(e, o):
        return build_attack(model, e, aa, n_classes=10, seed=0, **o)

    def probe(own: float, norm: str = "linf", eps: float = 0.1):
        return sanity.sanity_probe(model, build, "autoattack", x, y, eps, tol=0.05, norm=norm, own_asr=own,
                                   at_least_pgd=attack_info(aa).at_least_pgd)

    assert attack_info(aa).at_least_pgd and not attack_info({"name": "square"}).at_least_pgd
    strong = probe(own=1.0)
    assert strong.reasons == [] and strong.asr["pgd"] > 0.2
    assert "weaker_than_pgd" in probe(own=strong.asr["pgd"] - 2 / len(y)).reasons
    assert "weaker_than_pgd" not in probe(own=strong.asr["pgd"] - 1 / len(y)).reasons
    aa.norm = "l2"
    l2 = probe(own=1.0, norm="l2", eps=1.0)
    assert math.isnan(l2.asr["fgsm"]) and l2.reasons == [] and l2.asr["pgd"] >= l2.asr["noise"]
