"""Progress bars that stay readable in logs: frequent on a terminal, every 30 s otherwise."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("leave", interactive)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
