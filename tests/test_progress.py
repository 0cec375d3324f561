"""Issue 31: nothing silent for more than ~10 s. A step whose progress bar cannot move (one batch, CROWN,
one smoothing certificate, IG) logs a heartbeat line at that interval, and none once it has ended."""

from __future__ import annotations

import logging
import re
import time

import pytest

from robustsweep.core import progress as progress_mod
from robustsweep.core.progress import heartbeat, relay


def test_a_heartbeat_line_per_interval_while_the_block_runs_and_none_after(caplog):
    caplog.set_level(logging.INFO, logger="robustsweep.progress")
    with heartbeat("autoattack: batch 1 of 1 (128 images)", every_s=0.05):
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 2, lines
    assert all(re.fullmatch(r"autoattack: batch 1 of 1 \(128 images\): still running \(\d+ s\)", m)
               for m in lines), lines
    n = len(lines)
    time.sleep(0.2)
    assert len(caplog.records) == n  # the thread ended with the block


def test_a_failing_block_stops_its_heartbeat_and_raises(caplog):
    caplog.set_level(logging.INFO, logger="robustsweep.progress")
    with pytest.raises(ValueError, match="inside"), heartbeat("x", every_s=0.05):
        raise ValueError("inside")
    n = len(caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == n


class _SlowAttack:
    """An attack that takes 0.3 s on its batch and perturbs nothing."""

    norm = "Linf"

    def __call__(self, x, y):
        time.sleep(0.3)
        return x.clone()


def test_a_one_batch_attack_is_not_silent(digits_model, caplog, monkeypatch):
    """The attack loop wraps each batch in a heartbeat: an attack slower than the interval on one batch
    (the bar at 0 % of issue 31) logs lines while it runs."""
    from robustsweep.core.guards import frozen
    from robustsweep.steps.attacks import evaluate

    model, ds, _ = digits_model
    monkeypatch.setattr(progress_mod, "EVERY_S", 0.05)
    caplog.set_level(logging.INFO, logger="robustsweep.progress")
    with frozen(model):
        res = evaluate(model, _SlowAttack(), ds.x_eval[:64], ds.y_eval[:64], 0.1, 1024, desc="pgd eps=0.1")
    assert res.n_batches_checked == 1
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pgd eps=0.1: batch 1 of 1")]
    assert len(beats) >= 2, [r.getMessage() for r in caplog.records]


def test_relay_logs_each_new_matching_line_of_the_job_logs_once(tmp_path, caplog):
    """What a launcher shows of its workers' logs: each new finished cell or error, once, with its job."""
    caplog.set_level(logging.INFO, logger="robustsweep.progress")
    for n in (0, 1):
        (tmp_path / str(n)).mkdir()
    log0, log1 = tmp_path / "0" / "robustsweep.log", tmp_path / "1" / "robustsweep.log"
    log0.write_text("[t][robustsweep][INFO] - training baseline\n")
    with relay(tmp_path, "*/robustsweep.log", (" FINISHED in ", "[ERROR]"), prefix="job ", every_s=0.05):
        finished = "[t][robustsweep.tracking.cellrun][INFO] - cell a: run 1 FINISHED in 2 s\n"
        log0.write_text(log0.read_text() + finished)
        time.sleep(0.3)
        log1.write_text("[t][robustsweep][ERROR] - configuration error: x\n[t][x][INFO] - half a li")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("INFO", "job 0: cell a: run 1 FINISHED in 2 s"),
                     ("WARNING", "job 1: configuration error: x")], lines


def test_relay_says_what_the_workers_do_when_no_cell_finishes_for_a_while(tmp_path, caplog):
    """Workers training a baseline for minutes: a status line with the newest line of their logs
    every ``quiet_s``, not silence until the first cell finishes."""
    caplog.set_level(logging.INFO, logger="robustsweep.progress")
    (tmp_path / "3").mkdir()
    log3 = tmp_path / "3" / "robustsweep.log"
    with relay(tmp_path, "*/robustsweep.log", (" FINISHED in ",), prefix="job ", every_s=0.05, quiet_s=0.2):
        time.sleep(0.3)  # nothing written yet
        log3.write_text("[t][robustsweep.steps.train][INFO] - baseline small_cnn epoch 4/30: loss 0.43\n")
        time.sleep(0.3)
    said = [r.getMessage() for r in caplog.records]
    assert any("no line from the workers yet" in m for m in said), said
    assert any(m.endswith("newest line: job 3: baseline small_cnn epoch 4/30: loss 0.43") for m in said), said
    assert not any("FINISHED" in m for m in said)
