"""run(cfg) end to end in-process: metrics, one MLflow run with params/artifacts, baseline reuse."""

from __future__ import annotations

import logging
import math

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from robustsweep.pipeline import run
from robustsweep.steps.evaluate import EVALUATORS, evaluators
from robustsweep.tracking.store import exact_metrics, shown

evaluators()  # discover the declared evaluators
# The metrics the README lists for every cell, and the sanity evaluator's declared ones.
METRIC_NAMES = ("clean_acc", "robust_acc", "asr", "n_eval", "n_correct", "sparsity_measured", "ig_delta")
SANITY_METRICS = tuple(m for m in EVALUATORS["sanity"].metrics if m != "sanity_s")


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("robustsweep")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_run_logs_one_mlflow_run_with_metrics_params_artifacts(make_cfg, tmp_path):
    metrics = run(make_cfg("sparsity=0.25", "epsilon=8/255"))
    assert set(METRIC_NAMES) <= set(metrics)
    assert 0 <= metrics["asr"] <= 1 and metrics["robust_acc"] <= metrics["clean_acc"]
    assert metrics["sparsity_measured"] == pytest.approx(0.25, abs=0.005)

    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    exact = exact_metrics(r)
    for name in METRIC_NAMES:  # exact in the store, 4 significant digits where the UI shows them
        assert exact[name] == pytest.approx(metrics[name], rel=1e-12, nan_ok=True)
        assert r.data.metrics[name] == pytest.approx(shown(metrics[name]), rel=1e-12, nan_ok=True)
    assert r.data.metrics["clean_acc"] == float(f"{metrics['clean_acc']:.4g}")
    assert r.data.metrics["n_correct"] == metrics["n_correct"]  # counts stay whole
    assert r.data.params["epsilon"] == str(8 / 255)  # stored as the parsed float
    assert r.data.params["prune.method"] == "l1_unstructured"
    assert r.data.params["attack.name"] == "fgsm"
    assert r.data.tags["robustsweep.baseline"] == "trained"  # first job of a fresh store
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    ig = {a.path for a in client.list_artifacts(r.info.run_id, "ig")}
    assert "config.yaml" in top and {"ig/ig_maps.png", "ig/attributions.npz"} <= ig
    # artifacts live under outputs/mlartifacts, not in the launch directory
    assert str(tmp_path / "outputs" / "mlartifacts") in r.info.artifact_uri


def test_baseline_is_cached_and_reused(make_cfg, caplog, monkeypatch):
    import robustsweep.steps.train as train_mod

    caplog.set_level(logging.INFO)
    run(make_cfg("sparsity=0", "attribution.n_images=0"))
    assert "training baseline" in caplog.text

    def must_not_train(*a, **k):
        raise AssertionError("the cached baseline should have been reused")

    monkeypatch.setattr(train_mod, "train_model", must_not_train)
    caplog.clear()
    m = run(make_cfg("sparsity=0.5", "attribution.n_images=0"))
    assert "reusing cached baseline" in caplog.text
    assert m["sparsity_measured"] == pytest.approx(0.5, abs=0.005)


def test_changed_training_config_trains_a_new_baseline(make_cfg, caplog):
    from robustsweep.steps.train import baseline_key

    assert baseline_key(make_cfg()) != baseline_key(make_cfg("train.epochs=9"))
    assert baseline_key(make_cfg()) == baseline_key(make_cfg("sparsity=0.9", "epsilon=0.3",
                                                              "attack=pgd", "data.n_eval=10"))


def test_epsilon_zero_gives_asr_zero_end_to_end(make_cfg):
    m = run(make_cfg("epsilon=0", "attack=pgd", "attribution.n_images=0"))
    assert m["asr"] == 0.0 and m["robust_acc"] == m["clean_acc"]


def test_same_seed_same_metrics(make_cfg, tmp_path):
    # resume=false: compute the cell twice instead of returning the stored run
    a = run(make_cfg("attack=pgd", "attack.steps=3", "tracking.resume=false"))
    b = run(make_cfg("attack=pgd", "attack.steps=3", "tracking.resume=false"))
    assert "mlflow_s" in a and "mlflow_s" in b  # both computed, neither skipped
    timings = {k for k in a if k.endswith(("_s", "_mb"))}  # time and memory vary
    assert set(a) == set(b) and {*METRIC_NAMES, *SANITY_METRICS} <= set(a)
    for k in set(a) - timings:  # every number, sanity probe and IG included, bit for bit
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), k
    _, runs = _runs(tmp_path)
    hashes = {r.data.tags["robustsweep.model_sha256"] for r in runs}
    assert len(runs) == 2 and len(hashes) == 1


def test_environment_tracking_uri_wins(make_cfg, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    run(make_cfg("attribution.n_images=0"))
    assert other.exists()
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    mlflow.set_tracking_uri(None)


def test_bad_value_starts_no_mlflow_run(make_cfg, tmp_path):
    from robustsweep.config import ConfigError

    with pytest.raises(ConfigError):
        run(make_cfg("sparsity=1.5"))
    assert not (tmp_path / "outputs").exists()


def test_finished_cell_is_not_computed_again(make_cfg, caplog, tmp_path):
    a = run(make_cfg("attribution.n_images=0"))
    caplog.set_level(logging.INFO)
    b = run(make_cfg("attribution.n_images=0"))
    assert "already FINISHED" in caplog.text
    assert {k: b[k] for k in METRIC_NAMES if k in b} == {k: a[k] for k in METRIC_NAMES if k in a}
    assert len(_runs(tmp_path)[1]) == 1


def test_guards_and_sanity_are_recorded_on_the_run(make_cfg, tmp_path):
    m = run(make_cfg("attack=pgd", "attack.steps=5", "epsilon=0.1"))
    _, (r,) = _runs(tmp_path)
    assert r.data.metrics["guard_n_batches"] >= 1 and r.data.metrics["guard_max_dist"] <= 0.1 + 1e-6
    assert r.data.metrics["sanity_asr_eps0"] == 0 and r.data.metrics["sanity_asr_unbounded"] >= 0.99
    assert r.data.metrics["sanity_n_probe"] == min(64, m["n_correct"])
    assert len(r.data.tags["robustsweep.model_sha256"]) == 64
    # a sound model at a sane eps: no reason to suspect its numbers (its latency may be noise on a
    # busy machine, as under pytest-xdist: that says nothing about the attack)
    assert set(r.data.tags.get("suspect", "").split(",")) <= {"", "latency_noisy"}
    assert ("latency_noisy" in r.data.tags.get("suspect", "")) == bool(m["latency_noisy"])  # tag = metric


def test_ig_incomplete_at_the_cap_tags_the_cell_suspect(make_cfg, tmp_path):
    m = run(make_cfg("attribution.n_steps=2", "attribution.max_n_steps=2"))
    assert m["ig_n_steps"] == 2 and m["ig_n_incomplete"] > 0
    _, (r,) = _runs(tmp_path)
    assert r.info.status == "FINISHED" and "ig_incomplete" in r.data.tags["suspect"]


def test_ig_doubling_reaches_completeness_in_the_pipeline(make_cfg):
    m = run(make_cfg("attribution.n_steps=2", "attribution.max_n_steps=1024"))
    assert m["ig_n_steps"] > 2 and m["ig_n_incomplete"] == 0


def test_an_attack_that_changes_the_model_fails_the_run(make_cfg, tmp_path, monkeypatch):
    from robustsweep.core.errors import ModelChangedError
    from robustsweep.steps.attacks import ATTACKS, fgsm

    def tampering(model, eps, **kw):  # an attack with a side effect on the weights
        inner = fgsm(model, eps)

        def attack(x, y):
            with torch.no_grad():
                next(model.parameters()).mul_(1.0001)
            return inner(x, y)
        return attack
    monkeypatch.setitem(ATTACKS, "fgsm", tampering)
    with pytest.raises(ModelChangedError, match="attacking and attributing changed the model"):
        run(make_cfg())
    _, (r,) = _runs(tmp_path)
    assert r.info.status == "FAILED" and "ModelChangedError" in r.data.tags["robustsweep.error"]
