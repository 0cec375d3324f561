"""Checkpoints: safetensors round-trip, hash checked, pickled code never executed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from robustsweep.core.checkpoint import CheckpointError, load_into, load_state, save_checkpoint
from robustsweep.steps.models import Normalized


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # runs at unpickling time in an unsafe loader
        return (open, (self.target, "w"))


def _model() -> Normalized:
    torch.manual_seed(0)
    return Normalized(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (0.5,), (0.5,))


def test_roundtrip_and_hash(tmp_path):
    m = _model()
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(m, path, {"note": "x"})
    fresh = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (0.0,), (1.0,))
    load_into(fresh, load_state(path, digest), str(path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(_model(), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state(path, digest)
    with pytest.raises(CheckpointError):
        load_state(path)  # even without a hash, a truncated file does not half-load


@pytest.mark.parametrize("force_env", [False, True])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch, force_env):
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil(str(target))}, f)
    torch.save({"w": _Evil(str(target))}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError):
            load_state(p)
    assert not target.exists()


def test_plain_state_dict_pt_and_bare_network_weights(tmp_path):
    m = _model()
    torch.save({"state_dict": m.net.state_dict()}, tmp_path / "bare.pt")
    fresh = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (0.5,), (0.5,))
    load_into(fresh, load_state(tmp_path / "bare.pt"), "bare.pt")
    assert torch.equal(fresh.net[1].weight, m.net[1].weight)


def test_mismatched_weights_are_reported(tmp_path):
    torch.save(nn.Linear(5, 3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_into(_model(), load_state(tmp_path / "w.pt"), "w.pt")


def test_temp_files_of_killed_writers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".m.safetensors.{dead}.abc123.tmp"
    live = tmp_path / f".m.safetensors.{os.getppid()}.def456.tmp"  # our parent: alive
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    save_checkpoint(_model(), tmp_path / "m.safetensors")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, "m.safetensors", "m.json"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar"])
def test_corrupted_cached_baseline_is_rebuilt_identically(tmp_path, caplog, damage):
    from robustsweep.config import compose, validate
    from robustsweep.steps.data import load_dataset
    from robustsweep.steps.train import get_baseline
    from tests.conftest import FAST, isolated_overrides

    cfg = validate(compose([*isolated_overrides(tmp_path), *FAST, "train.epochs=2"]))
    ds = load_dataset(cfg.data)
    cache = tmp_path / "cache"
    first, info = get_baseline(cfg, ds, torch.device("cpu"), cache)
    path = Path(info["path"])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF  # one weight byte: still a valid file, wrong hash
        path.write_bytes(bytes(data))
    else:
        path.with_suffix(".json").write_text("{not json")
    with caplog.at_level("INFO"):
        again, info2 = get_baseline(cfg, ds, torch.device("cpu"), cache)
    assert info2["source"] == "trained"
    if damage != "sidecar":
        assert "cached baseline unusable, retraining" in caplog.text and "SHA-256" in caplog.text
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # rebuilt from a fresh init, not from a half-loaded model
    assert get_baseline(cfg, ds, torch.device("cpu"), cache)[1]["source"] == "cache"
