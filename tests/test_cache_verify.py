"""The baseline cache verifies what it loads (issue 27, part A).

A cache entry is a safetensors file plus a JSON sidecar. Anyone who can write to
``outputs/cache/baselines`` can plant both, so neither is taken on trust: the sidecar's SHA-256 is
required and checked against the file, the clean test accuracy is recomputed on load, and an entry
whose sidecar is missing, partial or inconsistent with the weights is retrained and overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustsweep.config import compose, validate
from robustsweep.core.checkpoint import read_meta, save_checkpoint
from robustsweep.steps.data import load_dataset
from robustsweep.steps.train import accuracy, get_baseline
from robustsweep.tracking.store import exact_metrics
from tests.conftest import FAST, isolated_overrides

CPU = torch.device("cpu")
# two epochs: a model far better than chance in ~1 s, which is all these tests need
OVERRIDES = [*FAST, "train.epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A digits baseline trained once: (cfg, dataset, model, its info, its cache file's bytes)."""
    tmp = tmp_path_factory.mktemp("cache_verify")
    cfg = validate(compose([*isolated_overrides(tmp), *OVERRIDES]))
    ds = load_dataset(cfg.data)
    model, info = get_baseline(cfg, ds, CPU, tmp / "cache")
    assert info["trained"] and info["test_acc"] > 0.5, info["test_acc"]
    return cfg, ds, model, info, Path(info["path"]).read_bytes()


def _entry(cache: Path, info: dict) -> Path:
    """Where ``get_baseline`` looks for this config's entry inside ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    return cache / Path(info["path"]).name


def _wrong_model(model: torch.nn.Module) -> torch.nn.Module:
    """The trained network with its head's class rows rotated by one: a valid file for the same
    architecture that predicts the next class, so it is right on almost no image."""
    import copy

    bad = copy.deepcopy(model)
    head = bad.net[-1]
    with torch.no_grad():
        head.weight.copy_(head.weight.roll(1, dims=0))
        head.bias.copy_(head.bias.roll(1, dims=0))
    return bad


def _sidecar(meta: dict, path: Path) -> None:
    path.with_suffix(".json").write_text(json.dumps(meta))


def _assert_retrained_truthfully(cfg, ds, got_model, got, path: Path, trained_acc: float) -> None:
    assert got["source"] == "trained", got["source"]
    truth = accuracy(got_model, ds.x_test, ds.y_test)
    assert got["test_acc"] == truth == pytest.approx(trained_acc), (got["test_acc"], truth, trained_acc)
    meta = read_meta(path)  # the entry was overwritten with a truthful sidecar
    assert meta["test_acc"] == truth and meta["sha256"]
    _, info2 = get_baseline(cfg, ds, CPU, path.parent)
    assert info2["source"] == "cache" and info2["test_acc"] == truth


def test_planted_entry_with_wrong_accuracy_is_retrained(trained, tmp_path, caplog):
    cfg, ds, model, info, _ = trained
    path = _entry(tmp_path / "cache", info)
    bad = _wrong_model(model)
    bad_acc = accuracy(bad, ds.x_test, ds.y_test)
    assert bad_acc < 0.1
    # a valid file with a matching SHA-256, and a sidecar that claims 0.99
    meta = {k: v for k, v in info.items() if k not in ("sha256", "source", "path", "trained")}
    save_checkpoint(bad, path, {**meta, "test_acc": 0.99})
    with caplog.at_level("WARNING"):
        got_model, got = get_baseline(cfg, ds, CPU, path.parent)
    assert path.name in caplog.text and "0.99" in caplog.text, caplog.text
    _assert_retrained_truthfully(cfg, ds, got_model, got, path, info["test_acc"])


def test_sidecar_without_sha256_is_retrained(trained, tmp_path, caplog):
    cfg, ds, _, info, blob = trained
    path = _entry(tmp_path / "cache", info)
    path.write_bytes(blob)  # the genuine weights: only the hash is missing
    meta = {k: v for k, v in info.items() if k not in ("sha256", "source", "path", "trained")}
    _sidecar(meta, path)
    with caplog.at_level("WARNING"):
        got_model, got = get_baseline(cfg, ds, CPU, path.parent)
    assert "sha256" in caplog.text and path.name in caplog.text, caplog.text
    _assert_retrained_truthfully(cfg, ds, got_model, got, path, info["test_acc"])


@pytest.mark.parametrize("drop", ["everything", "test_acc"])
def test_partial_sidecar_is_retrained_not_a_keyerror(trained, tmp_path, caplog, drop):
    cfg, ds, _, info, blob = trained
    path = _entry(tmp_path / "cache", info)
    path.write_bytes(blob)
    meta = {} if drop == "everything" else {
        k: v for k, v in info.items() if k not in ("test_acc", "source", "path", "trained")}
    _sidecar(meta, path)
    with caplog.at_level("WARNING"):
        got_model, got = get_baseline(cfg, ds, CPU, path.parent)
    assert "test_acc" in caplog.text and path.name in caplog.text, caplog.text
    _assert_retrained_truthfully(cfg, ds, got_model, got, path, info["test_acc"])


def test_sidecar_with_wrong_sha256_is_retrained(trained, tmp_path, caplog):
    cfg, ds, _, info, blob = trained
    path = _entry(tmp_path / "cache", info)
    path.write_bytes(blob)
    meta = {k: v for k, v in info.items() if k not in ("source", "path", "trained")}
    _sidecar({**meta, "sha256": "0" * 64}, path)
    with caplog.at_level("WARNING"):
        got_model, got = get_baseline(cfg, ds, CPU, path.parent)
    assert "SHA-256" in caplog.text and path.name in caplog.text, caplog.text
    _assert_retrained_truthfully(cfg, ds, got_model, got, path, info["test_acc"])


def test_planted_entry_reports_the_true_baseline_test_acc_in_mlflow(trained, make_cfg, tmp_path):
    """End to end: the number a cell logs as ``baseline_test_acc`` is the model's, not the sidecar's."""
    from mlflow.tracking import MlflowClient

    from robustsweep import run

    _, _, model, info, _ = trained
    cfg = make_cfg("train.epochs=2", "attribution=none", "attribution.n_images=0", "checks.sanity=false",
                   "efficiency.latency=false", "sparsity=0")
    path = _entry(tmp_path / "outputs" / "cache" / "baselines", info)
    meta = {k: v for k, v in info.items() if k not in ("sha256", "source", "path", "trained")}
    save_checkpoint(_wrong_model(model), path, {**meta, "test_acc": 0.99})
    m = run(cfg)
    assert m["baseline_test_acc"] == pytest.approx(info["test_acc"])
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (r,) = client.search_runs([client.get_experiment_by_name("robustsweep").experiment_id])
    assert exact_metrics(r)["baseline_test_acc"] == pytest.approx(info["test_acc"])
    assert r.data.tags["robustsweep.baseline"] == "trained"


@pytest.mark.parametrize(("written_on", "kept"), [("cuda", True), ("cpu", False)])
def test_accuracy_off_by_one_image(trained, tmp_path, written_on, kept):
    """One test image off: kept (with the recomputed number) when the sidecar was written on
    another device type, where a near-tie may round the other way; retrained on the same one."""
    cfg, ds, _, info, blob = trained
    path = _entry(tmp_path / "cache", info)
    path.write_bytes(blob)
    meta = {k: v for k, v in info.items() if k not in ("source", "path", "trained")}
    off = info["test_acc"] + 1 / len(ds.y_test)
    _sidecar({**meta, "test_acc": off, "test_acc_device": written_on}, path)
    got_model, got = get_baseline(cfg, ds, CPU, path.parent)
    truth = accuracy(got_model, ds.x_test, ds.y_test)
    assert got["test_acc"] == truth == info["test_acc"], (got["test_acc"], truth)
    assert got["source"] == ("cache" if kept else "trained")
