"""Devices, batch sizes and arithmetic (``device``, ``attack.batch_size``, ``perf.amp``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from robustsweep.core.errors import ConfigError
from robustsweep.core.schema import Amp

if TYPE_CHECKING:
    import torch

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


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when present, else CPU. Asking for a device that is absent is an error."""
    import torch

    if not DEVICE_RE.match(str(name)):
        raise ConfigError(f"device={name!r} is not valid; allowed: auto, cpu, cuda, cuda:N, mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA GPU is available here; allowed: auto, cpu")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} GPU(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but MPS is not available here; allowed: auto, cpu")
    return torch.device(name)
