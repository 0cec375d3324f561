"""The certify evaluator: certified accuracy by IBP / CROWN on every cell, never above the attack's
robust accuracy (a violation stops the run), and bad input refused before any run."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from robustsweep.config import ConfigError, validate
from robustsweep.pipeline import run
from robustsweep.steps.evaluate import certify as certify_mod

IBP_TRAINED = ["objective=ibp", "objective.eps=0.1", "epsilon=0.05", "attack=pgd", "sparsity=0",
               "attribution=none", "data.n_eval=60"]


def test_certified_accuracy_is_logged_and_below_the_attacks(make_cfg, tmp_path):
    """An IBP-trained small CNN on digits (measured, 359 images: IBP certifies 0.66 at eps 0.05,
    CROWN-IBP 0.71; a standard one 0.0): both methods certify some images, never more than PGD
    leaves robust, and CROWN certifies at least what IBP does here."""
    ibp = run(make_cfg(*IBP_TRAINED, "certify=ibp"))
    crown = run(make_cfg(*IBP_TRAINED, "certify=crown"))
    for m in (ibp, crown):
        assert 0 < m["certified_acc"] <= m["robust_acc"] <= m["clean_acc"]
        assert m["certified_gap"] == pytest.approx(m["robust_acc"] - m["certified_acc"])
        assert m["n_certified"] == pytest.approx(m["certified_acc"] * m["n_eval"])
    assert crown["certified_acc"] >= ibp["certified_acc"]
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("robustsweep")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.params["certify.name"] for r in runs} == {"ibp", "crown"}
    assert all("certified_acc" in r.data.metrics for r in runs)


def test_a_certificate_the_attack_breaks_stops_the_run(make_cfg, tmp_path, monkeypatch):
    """A bound that claims every image (a broken bound) against PGD that fools some: an error, and
    no FINISHED run with the wrong number."""
    monkeypatch.setattr(certify_mod, "ibp_margins", lambda model, x, y, eps, k: torch.ones(len(y), k - 1))
    with pytest.raises(certify_mod.CertificateViolationError, match=r"certified robust at eps=0\.1 are "
                                                                     r"misclassified"):
        run(make_cfg("epsilon=0.1", "attack=pgd", "sparsity=0", "attribution=none", "data.n_eval=60",
                     "certify=ibp"))
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("robustsweep")
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "FINISHED"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["certify=ibp", "attack=pgd", "attack.norm=l2", "epsilon=0.5"],
     "certify='ibp' is not valid; allowed: an L-inf attack"),
    (["certify=crown", "model=resnet_small"], "certify.intermediate='crown' is not valid; allowed: ibp for a "
                                              "network with residual blocks"),
    (["certify=crown", "certify.max_memory_mb=0.01"], "certify.max_memory_mb=0.01 is not valid; allowed: >= "),
    (["certify=crown", "certify.intermediate=full"], "certify.intermediate='full' is not valid"),
    (["certify=ibp", "certify.batch_size=0"], "certify.batch_size=0 is not valid"),
    (["certify=ibp", "quantize=int8"], "certify='ibp' is not valid; allowed: a float model"),
    (["certify=ibp", "model=custom", "model._target_=tests.nets.pooled_cnn"],
     "net.2 (MaxPool2d) is not a layer the bounds can handle"),
    (["certify.name=smooth"], "certify.name='smooth' is not valid; allowed: none, ibp, crown"),
    (["objective=ibp", "objective.kappa=2"], "objective.kappa=2 is not valid"),
    (["objective=ibp", "objective.ramp=0"], "objective.ramp=0 is not valid"),
    (["objective=ibp", "objective.warmup=0.6", "objective.ramp=0.6"],
     "objective.ramp=0.6 is not valid; allowed: at most 1 - objective.warmup"),
    (["objective=ibp", "model=custom", "model._target_=tests.nets.pooled_cnn"],
     "objective.name='ibp' is not valid; allowed: a model whose layers IBP handles"),
])
def test_bad_certify_input_is_refused_before_any_run(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert message in str(e.value)
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
