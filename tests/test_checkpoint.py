"""Checkpoints: safetensors round-trip, hash checked, pickled code never executed."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from robustsweep.checkpoint import CheckpointError, load_into, load_state, save_checkpoint
from robustsweep.models import Normalized


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
