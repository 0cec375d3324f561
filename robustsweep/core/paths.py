"""Where things are: the launch directory (Hydra may chdir into a job folder) and user paths."""

from __future__ import annotations

import os
import re
from pathlib import Path


def launch_dir() -> Path:
    """The directory the command was launched from, even if Hydra changed into a job dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def resolve_path(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """Resolve a user path against the launch directory (Hydra's original cwd)."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (base or launch_dir()) / p


def redact_url(text: str) -> str:
    """Hide every password in URLs such as ``postgresql://user:pw@host/db`` (``user:***@``): before a
    URL is logged, tagged, logged as an MLflow param or shown in an error."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


# The configs: an installed wheel ships them as robustsweep/conf; the source tree and an editable
# install read <repo>/conf.
_PKG = Path(__file__).resolve().parent.parent
CONF_DIR = _PKG / "conf" if (_PKG / "conf").is_dir() else _PKG.parent / "conf"
