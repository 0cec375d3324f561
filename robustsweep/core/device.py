"""Devices, batch sizes and arithmetic (``device``, ``attack.batch_size``, ``perf.amp``)."""

from __future__ import annotations

import getpass
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from robustsweep.core.errors import ConfigError
from robustsweep.core.schema import Amp

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # not POSIX: no flock, so device=auto shares GPUs by pid (see _claim_gpu)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

# Images per attack batch for attack.batch_size=auto (measured, README "Performance"): a 2-core CPU
# runs forward + input-gradient fastest at 64-128 (and 500 holds ~2.4 GB of activations for
# ResNet-20); a GPU needs large batches to fill.
AUTO_BATCH = {"cpu": 128, "cuda": 1024}


def amp_name(cfg: DictConfig) -> str:
    """``perf.amp`` as its name ("none", "bf16"): the schema makes it an ``Amp``, YAML a string."""
    amp = cfg.perf.amp if cfg.get("perf") is not None else "none"
    return amp.value if isinstance(amp, Amp) else str(amp)


def attack_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """``attack.batch_size``, with ``auto`` resolved for ``device``."""
    bs = cfg.attack.get("batch_size", "auto")
    return AUTO_BATCH.get(device.type, 128) if bs == "auto" else int(bs)


def check_device(name: str) -> None:
    """Raise ``ConfigError`` unless ``name`` is a valid device that exists here. Claims no GPU slot:
    for where a device is only checked (config validation in the sweeper's process), so that such a
    process does not hold a GPU slot that a worker should get."""
    import torch

    if not DEVICE_RE.match(str(name)):
        raise ConfigError(f"device={name!r} is not valid; allowed: auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA GPU is available here; allowed: auto, cpu")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} GPU(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available here; allowed: auto, cpu")


def device_type(name: str) -> str:
    """The kind of device ``name`` resolves to ("cpu", "cuda", "mps"), checked, without claiming a
    GPU slot: what validation needs to know."""
    import torch

    check_device(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when present, else CPU; on a host with several visible GPUs, this process's
    own GPU (``_claim_gpu``). Asking for a device that is absent is an error. ``cuda:N`` is never
    remapped."""
    import torch

    check_device(name)
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()  # counts CUDA_VISIBLE_DEVICES only
    return torch.device("cuda") if n <= 1 else torch.device(f"cuda:{_claim_gpu(n)}")


SLOT_DIR_ENV = "ROBUSTSWEEP_GPU_SLOT_DIR"
MAX_PER_GPU = 8  # slots n..8n-1: the (n+1)-th worker and later share a GPU, round-robin
_claimed: tuple[int, int | None] | None = None  # (GPU index, fd holding its slot's flock) for this process
_claim_guard = threading.Lock()


def slot_dir() -> Path:
    """Where the GPU slot locks of this host and user live (``$ROBUSTSWEEP_GPU_SLOT_DIR`` overrides)."""
    uid = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return Path(os.environ.get(SLOT_DIR_ENV) or Path(tempfile.gettempdir()) / f"robustsweep-gpu-slots-{uid}")


def _claim_gpu(n: int) -> int:
    """This process's GPU of ``n``: the first time, take the lowest free slot (an exclusive,
    non-blocking flock on ``slot_dir()/<slot>.lock``) and keep it for the process's lifetime.

    Why: the joblib launcher's worker processes persist and run several cells each; with plain
    ``cuda`` they would all land on cuda:0 of a multi-GPU host. Job number modulo n is not enough,
    as a slow job can still run beside a later job of the same residue; a lock held by the running
    process is. The kernel drops a flock when its process exits, even on SIGKILL, so a dead
    worker's slot is free again. Slots n and up share GPUs (slot % n); SLURM jobs see one GPU each
    (CUDA_VISIBLE_DEVICES), so they never get here."""
    global _claimed
    with _claim_guard:
        if _claimed is None:
            _claimed = _take_slot(n)
        return _claimed[0]


def _take_slot(n: int) -> tuple[int, int | None]:
    pid = os.getpid()
    if fcntl is None:
        log.warning("device=auto: no flock on this platform; worker pid %d uses cuda:%d of %d (pid %% %d), "
                    "and workers may share a GPU", pid, pid % n, n, n)
        return pid % n, None
    folder = slot_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for slot in range(n * MAX_PER_GPU):
            path = folder / f"{slot}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by a live process
                os.close(fd)
                continue
            except OSError:
                os.close(fd)
                raise
            gpu, msg = slot % n, "device=auto: worker pid %d uses cuda:%d of %d (slot lock %s)"
            if slot < n:
                log.info(msg, pid, gpu, n, path)
            else:  # every lower slot is held: at least slot + 1 workers, slot // n of them on this GPU
                log.warning(msg + ", SHARED: at least %d workers on %d GPUs, so at least %d share cuda:%d",
                            pid, gpu, n, path, slot + 1, n, slot // n + 1, gpu)
            return gpu, fd
    except OSError as e:
        log.warning("device=auto: cannot lock a GPU slot in %s (%s); worker pid %d uses cuda:%d of %d "
                    "(pid %% %d), and workers may share a GPU", folder, e, pid, pid % n, n, n)
        return pid % n, None
    log.warning("device=auto: all %d slots in %s are held (more than %d workers per GPU); worker pid %d "
                "uses cuda:%d of %d (pid %% %d)", n * MAX_PER_GPU, folder, MAX_PER_GPU, pid, pid % n, n, n)
    return pid % n, None


# ----------------------------------------------------------------------------- CPU threads per job
PARALLEL_ENV = "ROBUSTSWEEP_PARALLEL"  # set by the sweepers: how many jobs of this batch run at once


def parallel_jobs(launcher: DictConfig, batch: int) -> int:
    """How many of ``batch`` jobs the configured Hydra launcher runs at once on *this* machine:
    joblib's ``n_jobs`` (negative as joblib counts it: -1 = every core), submitit's local executor's
    ``array_parallelism``; 1 for the in-process launcher and for SLURM (jobs on other nodes get
    their own cores from the scheduler)."""
    cores = os.cpu_count() or 1
    n = launcher.get("n_jobs")
    if n is None and str(launcher.get("_target_", "")).endswith("LocalLauncher"):
        n = launcher.get("array_parallelism") or batch
    if n is None:
        return 1
    n = int(n)
    return max(1, min(batch, cores + 1 + n if n < 0 else n))


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM or taskset allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cpu_threads() -> int:
    """Give this job its share of the cores: ``cores // parallel jobs`` torch threads (at least 1).
    Four joblib workers with torch's default thread count (every core each) on a 2-core machine
    fought over the cores; a baseline that trains in 3 s took > 15 min per worker. An
    ``OMP_NUM_THREADS`` set by the user or the launcher wins. Returns the thread count (logged)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        log.info("torch threads: %d (OMP_NUM_THREADS=%s, set by the user or the launcher)", n,
                 os.environ["OMP_NUM_THREADS"])
        return n
    k = int(os.environ.get(PARALLEL_ENV) or 1)
    if k <= 1:
        return torch.get_num_threads()
    cores = cpu_cores()
    n = max(1, cores // k)
    torch.set_num_threads(n)
    log.info("torch threads: %d (%d cores shared by %d parallel jobs)", n, cores, k)
    return n
