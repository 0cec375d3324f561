"""Shared fixtures: an isolated outputs/ + MLflow store per test, and a trained digits model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from robustsweep.config import compose


def isolated_overrides(tmp: Path) -> list[str]:
    """Overrides that keep outputs, caches and the MLflow store inside ``tmp``."""
    return [
        f"paths.output_dir={tmp}/outputs",
        f"tracking.uri=sqlite:///{tmp}/outputs/mlflow.db",
        f"tracking.artifact_dir={tmp}/outputs/mlartifacts",
    ]


# Small and fast: digits, few training epochs, few IG steps.
FAST = ["train.epochs=8", "attribution.n_images=2", "attribution.n_steps=16"]


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _fresh_reuse_caches() -> None:
    """Each test starts without models or predictions cached by an earlier one (robustsweep.tracking.reuse)."""
    from robustsweep.tracking import reuse

    reuse.clear()


@pytest.fixture
def make_cfg(tmp_path: Path):
    def _make(*overrides: str) -> DictConfig:
        return compose([*isolated_overrides(tmp_path), *FAST, *overrides])

    return _make


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory):
    """A small CNN trained on digits (~1 s), with its dataset and config."""
    from robustsweep.config import validate
    from robustsweep.steps.data import load_dataset
    from robustsweep.steps.train import get_baseline

    tmp = tmp_path_factory.mktemp("digits")
    cfg = validate(compose([*isolated_overrides(tmp), *FAST]))
    ds = load_dataset(cfg.data)
    model, info = get_baseline(cfg, ds, torch.device("cpu"), tmp / "cache")
    assert info["test_acc"] > 0.9, info["test_acc"]
    return model, ds, cfg
