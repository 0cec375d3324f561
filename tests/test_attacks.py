"""Attacks: inside the eps-ball and [0, 1]; eps=0 does nothing; PGD is at least as strong as FGSM."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from robustsweep.config import ConfigError
from robustsweep.core.device import resolve_device
from robustsweep.core.guards import AttackGuardError, check_adversarial, frozen
from robustsweep.steps.attacks import build_attack, evaluate
from robustsweep.steps.data import to_float

FGSM = OmegaConf.create({"name": "fgsm", "batch_size": 128})
PGD = OmegaConf.create({"name": "pgd", "steps": 10, "step_size": None, "random_start": True,
                        "batch_size": 128})


@pytest.mark.parametrize("acfg", [FGSM, PGD], ids=["fgsm", "pgd"])
def test_eps_zero_gives_zero_asr(digits_model, acfg):
    model, ds, _ = digits_model
    res = evaluate(model, build_attack(model, 0.0, acfg), ds.x_eval, ds.y_eval, 0.0, 128)
    assert res.n_correct > 0 and res.asr == 0.0 and res.robust_acc == res.clean_acc


@pytest.mark.parametrize("acfg", [FGSM, PGD], ids=["fgsm", "pgd"])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_adversarials_stay_in_the_eps_ball_and_unit_box(digits_model, acfg, eps):
    model, ds, _ = digits_model
    x, y = to_float(ds.x_eval[:64]), ds.y_eval[:64]
    with frozen(model):
        x_adv = build_attack(model, eps, acfg)(x, y)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv != x).any()  # it did something


def test_pgd_is_at_least_as_strong_as_fgsm(digits_model):
    model, ds, _ = digits_model
    eps = 0.1
    torch.manual_seed(0)
    f = evaluate(model, build_attack(model, eps, FGSM), ds.x_eval, ds.y_eval, eps, 128)
    p = evaluate(model, build_attack(model, eps, PGD), ds.x_eval, ds.y_eval, eps, 128)
    assert f.n_correct == p.n_correct
    assert p.asr >= f.asr
    assert 0 < f.asr < 1


def test_metric_definitions(digits_model):
    model, ds, _ = digits_model
    eps = 0.1
    res = evaluate(model, build_attack(model, eps, FGSM), ds.x_eval, ds.y_eval, eps, 100)
    clean_ok = res.clean_pred == ds.y_eval
    adv_ok = res.adv_pred == ds.y_eval
    assert res.n_correct == int(clean_ok.sum())
    assert res.robust_acc == pytest.approx(float((clean_ok & adv_ok).float().mean()))
    assert res.asr == pytest.approx(float((clean_ok & ~adv_ok).sum() / clean_ok.sum()))
    assert res.robust_acc == pytest.approx(res.clean_acc * (1 - res.asr))


def test_asr_is_nan_not_zero_when_nothing_is_correct(digits_model):
    model, ds, _ = digits_model
    with torch.no_grad():
        wrong = (model(to_float(ds.x_eval[:20])).argmax(1) + 1) % 10  # labels it never predicts
    res = evaluate(model, build_attack(model, 0.1, FGSM), ds.x_eval[:20], wrong, 0.1, 20)
    assert res.n_correct == 0 and math.isnan(res.asr)


def test_attacks_leave_model_and_batchnorm_untouched(digits_model):
    model, ds, _ = digits_model
    model.train()  # arrives in train mode: BatchNorm must still not update
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, build_attack(model, 0.1, PGD), ds.x_eval[:64], ds.y_eval[:64], 0.1, 32)
    assert model.training  # mode restored
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_guard_rejects_out_of_ball_and_out_of_box():
    x = torch.full((2, 1, 4, 4), 0.5)
    with pytest.raises(AttackGuardError, match="eps-ball"):
        check_adversarial(x, x + 0.2, 0.1)
    with pytest.raises(AttackGuardError, match=r"\[0, 1\]"):
        check_adversarial(x, x * 0 + 1.05, 1.0)
    check_adversarial(x, x + 0.1, 0.1)  # on the boundary is fine


def test_cuda_without_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="device='cuda'"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
