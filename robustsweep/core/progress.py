"""Progress that stays readable in logs: bars (frequent on a terminal, every 10 s otherwise), and a
heartbeat line for a step whose bar cannot move.

A bar advances per batch; an attack on one batch (AutoAttack on 128 CIFAR images: minutes on a CPU),
CROWN's layer-by-layer bounds or one smoothing certificate gives it nothing to advance on, and a
user saw 0 % for minutes (issue 31). ``heartbeat`` logs a line every ``every_s`` seconds while such
a block runs, from a daemon thread that only reads the clock, and none after it ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("robustsweep.progress")
EVERY_S = 10.0  # the longest silence in a log (issue 31: "nothing silent for more than ~10 s")


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else EVERY_S)
    kwargs.setdefault("leave", interactive)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@contextmanager
def _periodically(fn: Callable[[], None], every_s: float, name: str) -> Iterator[None]:
    """Call ``fn`` every ``every_s`` seconds from a daemon thread while the block runs; the thread
    has ended when the block exits (normally or by an exception)."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            fn()

    thread = threading.Thread(target=loop, name=name[:60], daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def heartbeat(desc: str, every_s: float | None = None) -> Iterator[None]:
    """``desc: still running (N s)`` every ``every_s`` seconds (default ``EVERY_S``) while the block runs."""
    t0 = time.monotonic()
    with _periodically(lambda: log.info("%s: still running (%.0f s)", desc, time.monotonic() - t0),
                       EVERY_S if every_s is None else every_s, f"heartbeat {desc}"):
        yield


@contextmanager
def relay(folder: Path, pattern: str, contains: tuple[str, ...], prefix: str = "",
          every_s: float = 2.0, quiet_s: float | None = EVERY_S) -> Iterator[None]:
    """While the block runs, log each new line holding one of ``contains`` from the files
    ``folder.glob(pattern)`` (the job logs of a sweep's worker processes, which write to their own
    files, not to this terminal), prefixed with the file's folder name (a Hydra job's number); once
    more at the end, so that no line is missed. Lines logged there at ERROR are relayed as warnings.
    After ``quiet_s`` seconds without such a line, one status line: how many job logs there are and
    the newest line any of them wrote (a worker training a baseline for minutes is not silence)."""
    offsets: dict[Path, int] = {}
    t0 = said = time.monotonic()
    newest: tuple[str, str] | None = None  # (job, text) of the newest unrelayed line since the last status

    def say(level: int, msg: str, *args: Any) -> None:
        nonlocal said
        log.log(level, msg, *args)
        said = time.monotonic()

    def scan() -> None:
        nonlocal newest
        paths = sorted(folder.glob(pattern))
        for path in paths:
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # whole lines only: a job may be writing the rest
            offsets[path] = offsets.get(path, 0) + end
            for line in chunk[:end].decode(errors="replace").splitlines():
                text = line.split("] - ", 1)[-1].strip()
                if any(c in line for c in contains):
                    say(logging.WARNING if "[ERROR]" in line else logging.INFO, "%s%s: %s", prefix,
                        path.parent.name, text)
                elif text:
                    newest = (path.parent.name, text)
        # scans come every every_s: "at least quiet_s - every_s" keeps the silence within quiet_s
        if quiet_s is not None and time.monotonic() - said >= quiet_s - every_s:
            what = (f"newest line: {prefix}{newest[0]}: {newest[1]}" if newest
                    else "no line from the workers yet")
            say(logging.INFO, "%d job log%s, %.0f s in; %s", len(paths), "" if len(paths) == 1 else "s",
                time.monotonic() - t0, what)
            newest = None

    try:
        with _periodically(scan, every_s, "relay"):
            yield
    finally:
        scan()
