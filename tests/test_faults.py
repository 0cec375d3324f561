"""Faults during a sweep: a job that raises, calls sys.exit, is interrupted (Ctrl-C) or SIGKILLed.

In every case: finished cells are kept, the faulty cell is FAILED (or re-run on relaunch), the
sweep says what failed, the relaunch completes exactly the missing cells, no temp files remain.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from robustsweep.tracking.sweep import CELL_TAG, ERROR_TAG, ROLE_TAG
from tests.test_cli import REPO, cli
from tests.test_sweep import _runs

pytestmark = pytest.mark.slow
EPS = ["0.05", "0.1", "0.2"]


def _sweep(tmp_path: Path, mode: str, *extra: str):
    os.environ["PYTHONPATH"] = str(REPO)  # the job process imports tests.faults
    os.environ["ROBUSTSWEEP_TEST_FAULT"] = mode
    return cli(tmp_path, "-m", f"epsilon={','.join(EPS)}", "train.epochs=3", "attribution=none",
               "attack=fgsm", "attack.name=fault", "+attack.fault_eps=0.1",
               "+hydra.callbacks.faults._target_=tests.faults.Faults", *extra)


def _cells(tmp_path: Path):
    return [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "cell"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after the test
    monkeypatch.setenv("ROBUSTSWEEP_TEST_FAULT", "")


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_raise_or_sys_exit_fails_one_cell_and_the_sweep_goes_on(tmp_path, mode):
    p = _sweep(tmp_path, mode)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "1 of 3 cells failed" in out and "epsilon=0.1" in out
    expected = "injected fault" if mode == "raise" else "sys.exit(3)"
    assert expected in out
    cells = _cells(tmp_path)
    assert sorted(r.info.status for r in cells) == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r for r in cells if r.info.status == "FAILED")
    tag = "injected fault" if mode == "raise" else "SystemExit: 3"
    assert failed.data.params["epsilon"] == "0.1" and tag in failed.data.tags[ERROR_TAG]
    (parent,) = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize("mode", ["interrupt", "kill"])
def test_interrupt_or_sigkill_keeps_finished_cells_and_relaunch_completes(tmp_path, mode):
    p = _sweep(tmp_path, mode)
    out = p.stdout + p.stderr
    cells = _cells(tmp_path)
    if mode == "interrupt":
        assert p.returncode == 130, out[-3000:]
        assert "sweep interrupted (KeyboardInterrupt): 1 of 3 cells are FINISHED" in out
        assert "epsilon=0.1" in out.split("not finished")[-1]
        assert sorted(r.info.status for r in cells) == ["FAILED", "FINISHED"]
        (parent,) = [r for r in _runs(tmp_path) if r.data.tags.get(ROLE_TAG) == "sweep"]
        assert parent.info.status == "KILLED"
    else:
        assert p.returncode == -9, out[-3000:]
        assert sorted(r.info.status for r in cells) == ["FINISHED", "RUNNING"]  # what -9 leaves
    # Relaunch without the fault: exactly the two missing cells run, nothing twice.
    p = _sweep(tmp_path, "none")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "1 already FINISHED in the store (skipped), 2 to run" in out
    cells = _cells(tmp_path)
    finished = [r for r in cells if r.info.status == "FINISHED"]
    assert len(finished) == 3 and len({r.data.tags[CELL_TAG] for r in finished}) == 3
    assert [r.info.status for r in cells].count("FAILED") == 1  # the interrupted/killed attempt
    assert not [f for f in (tmp_path / "outputs").rglob("*") if f.name.endswith(".tmp")]
