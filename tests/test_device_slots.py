"""device=auto on a multi-GPU host: one GPU per worker process, by slot locks (robustsweep.core.device).

Simulated on CPU: torch.cuda reports 4 GPUs, and each test asserts the mapping (which ``cuda:K`` a
process gets), never a GPU. The worker processes are separate Python processes that patch torch.cuda
the same way and stay alive, holding their slot, until all of them have claimed one. They stand in
a stub for torch (cuda.is_available, cuda.device_count, device) instead of importing it: ~0.2 s a
process instead of ~3 s on a busy 2-core box; this file's in-process tests use the real torch.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from robustsweep.core import device as dev
from robustsweep.core.device import SLOT_DIR_ENV, check_device, resolve_device
from robustsweep.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# A worker: 4 simulated GPUs; claims with device=auto, writes a mark, then holds its slot until
# argv[2] marks exist (all workers have claimed), then prints its device. Its log goes to stderr.
WORKER = """
import logging, os, sys, time, types
from pathlib import Path
torch = types.ModuleType("torch")
torch.cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 4)
torch.device = str
sys.modules["torch"] = torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from robustsweep.core.device import resolve_device
marks, wait_for = Path(sys.argv[1]), int(sys.argv[2])
device = resolve_device("auto")
assert resolve_device("auto") == device
(marks / str(os.getpid())).write_text(str(device))
deadline = time.monotonic() + 60
while len(list(marks.iterdir())) < wait_for:
    if time.monotonic() > deadline:
        sys.exit("timed out waiting for the other workers")
    time.sleep(0.02)
print(device, flush=True)
"""


def start_workers(tmp: Path, n: int, wait_for: int) -> list[subprocess.Popen[str]]:
    marks = tmp / "marks"
    marks.mkdir(exist_ok=True)
    env = {**os.environ, SLOT_DIR_ENV: str(tmp / "slots"), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", WORKER, str(marks), str(wait_for)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[str, str]]:
    """Each worker's (device, log); all must exit 0."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=90)
        assert p.returncode == 0, stderr
        out.append((stdout.strip(), stderr))
    return out


def wait_for_marks(marks: Path, n: int, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 60
    while len(list(marks.iterdir())) < n:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "workers did not claim in time"
        time.sleep(0.02)


def forget_claim() -> None:
    """Drop this process's claimed slot (closing its lock), as if it were a new process."""
    if dev._claimed is not None and dev._claimed[1] is not None:
        os.close(dev._claimed[1])
    dev._claimed = None


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[int], None]]:
    """``gpus(n)``: simulate n visible CUDA GPUs (0 = no CUDA) in this process; slot locks in tmp_path."""

    def simulate(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    monkeypatch.setenv(SLOT_DIR_ENV, str(tmp_path / "slots"))
    monkeypatch.setattr(dev, "_claimed", None)
    yield simulate
    forget_claim()


def test_a_process_keeps_its_gpu(gpus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gpus(4)
    with caplog.at_level(logging.INFO, logger="robustsweep.core.device"):
        first = resolve_device("auto")
        assert [resolve_device("auto") for _ in range(3)] == [first] * 3
    assert first == torch.device("cuda:0")  # the first slot of an empty folder
    assert (tmp_path / "slots" / "0.lock").exists()
    said = [r.getMessage() for r in caplog.records if "device=auto" in r.getMessage()]
    assert len(said) == 1 and f"worker pid {os.getpid()} uses cuda:0 of 4 (slot lock" in said[0], said


def test_concurrent_workers_get_distinct_gpus(tmp_path: Path) -> None:
    out = finish(start_workers(tmp_path, 4, wait_for=4))
    assert sorted(d for d, _ in out) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], out
    assert all("uses cuda:" in log and "WARNING" not in log for _, log in out), out


def test_a_fifth_worker_shares_and_warns(tmp_path: Path) -> None:
    out = finish(start_workers(tmp_path, 5, wait_for=5))
    assert sorted(d for d, _ in out) == ["cuda:0", "cuda:0", "cuda:1", "cuda:2", "cuda:3"], out
    shared = [(d, log) for d, log in out if "WARNING" in log]
    assert len(shared) == 1, out
    d, log = shared[0]
    assert d == "cuda:0" and "SHARED: at least 5 workers on 4 GPUs, so at least 2 share cuda:0" in log, log


def test_a_killed_workers_slot_is_free_again(tmp_path: Path) -> None:
    holders = start_workers(tmp_path, 2, wait_for=99)  # they hold slots 0 and 1 until killed
    try:
        wait_for_marks(tmp_path / "marks", 2, holders)
        held = {p.pid: (tmp_path / "marks" / str(p.pid)).read_text() for p in holders}
        assert sorted(held.values()) == ["cuda:0", "cuda:1"], held
        victim = next(p for p in holders if held[p.pid] == "cuda:0")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        (tmp_path / "marks" / str(victim.pid)).unlink()
        assert (tmp_path / "slots" / "0.lock").exists()  # the file stays; its lock went with the process
        # The new worker waits until it and the survivor are marked (2), then reports its device.
        (d, log), = finish(start_workers(tmp_path, 1, wait_for=2))
        assert d == "cuda:0" and "WARNING" not in log, log
    finally:
        for p in holders:
            p.kill()
            p.communicate()


def test_explicit_devices_and_one_gpu_are_unchanged(gpus, tmp_path: Path) -> None:
    gpus(4)
    assert resolve_device("cuda:2") == torch.device("cuda:2")
    assert resolve_device("cuda") == torch.device("cuda")
    check_device("auto")
    assert not (tmp_path / "slots").exists()  # neither an explicit device nor a check claims a slot
    gpus(1)
    assert resolve_device("auto") in (torch.device("cuda"), torch.device("cuda:0"))
    with pytest.raises(ConfigError, match="only 1 GPU"):
        resolve_device("cuda:2")
    assert not (tmp_path / "slots").exists()


def test_no_gpu_is_cpu(gpus, tmp_path: Path) -> None:
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    assert not (tmp_path / "slots").exists()
