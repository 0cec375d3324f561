"""Checkpoints without pickle: safetensors, written atomically, verified by SHA-256 on load.

A ``.safetensors`` file holds only tensors, so loading one cannot execute code. User weights in
``.pt``/``.pth`` form are read with ``torch.load(weights_only=True)``, which refuses pickled
objects other than tensors and plain containers, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
removed from the environment for the call (that variable exists to turn the safety off).

Writes go to ``.<name>.<pid>.<random>.tmp`` in the target folder, are fsynced, then renamed over
the target (``os.replace`` is atomic on POSIX): a reader sees the old file or the new one, never
half of one. A process killed mid-write leaves its temp file; the next write into that folder
removes temp files whose writer process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted or does not fit the model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path) -> int:
    """Delete ``.<name>.<pid>.*.tmp`` files left by writers that no longer run; return how many."""
    n = 0
    for f in folder.glob(".*.tmp") if folder.is_dir() else ():
        parts = f.name.split(".")  # ['', name..., pid, random, 'tmp']
        pid = parts[-3] if len(parts) >= 4 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            f.unlink(missing_ok=True)
            n += 1
    if n:
        log.warning("removed %d temp file(s) left in %s by killed writers", n, folder)
    return n


def _temp_for(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = _temp_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any] | None = None) -> str:
    """Save ``model.state_dict()`` as safetensors + a JSON sidecar with its SHA-256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = _temp_for(path)
    os.close(fd)
    try:
        save_file(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sidecar = {"sha256": digest, **(meta or {})}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    return digest


def read_meta(path: Path) -> dict[str, Any] | None:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError:
        return None


@contextlib.contextmanager
def _env_without(name: str) -> Iterator[None]:
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


def load_state(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code; check its hash when one is known."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"checkpoint {path} does not match its recorded SHA-256 "
                              f"(truncated or modified)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        with _env_without("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle errors have no common base class
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return _state_dict_of(obj, path)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded ``.pt`` object: a state dict, or one under a trainer's usual key."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    return obj


# (path, size, mtime) of files check_checkpoint accepted: validate() runs once per sweep job
_CHECKED: set[tuple[str, int, int]] = set()


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a loadable checkpoint, without reading its weights.

    What ``load_state`` will do later, minus the tensor data: a ``.safetensors`` file's header is
    parsed (names, dtypes, shapes, offsets: a few KB, however large the file); a ``.pt`` file is
    unpickled weights-only with its storages memory-mapped, so nothing but the pickle is read. A
    ``.pt`` in torch's legacy (pre-1.6, non-zip) format cannot be mapped and is loaded whole, once
    here and once by the run: such files are old and small in practice."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    st = path.stat()
    seen = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if seen in _CHECKED:
        return
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
            if not names:
                raise CheckpointError(f"checkpoint {path} holds no tensors")
        else:
            with _env_without("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
                obj = torch.load(path, map_location="cpu", weights_only=True,
                                 mmap=zipfile.is_zipfile(path))
            _state_dict_of(obj, path)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors/pickle errors have no common base class
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    _CHECKED.add(seen)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load into a ``Normalized`` model, or into its inner ``net`` for bare-network weights."""
    target = model
    has_wrapper_keys = any(k.startswith("net.") for k in state)
    if not has_wrapper_keys and hasattr(model, "net"):
        target = model.net  # a plain network's weights: keep our normalisation buffers
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source} does not fit model "
                              f"{type(target).__name__}: {e}") from e
