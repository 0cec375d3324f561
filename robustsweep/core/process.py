"""Which process is this, and is that one still running? Identities that survive pid reuse.

A pid alone names a process only while it lives: after it dies the kernel hands the number to the
next process. ``(host, boot id, pid, start time in clock ticks since boot)`` names one process for
ever, so a claim or a lock file left by a SIGKILLed process is recognised as dead at once on the same
machine, even when its pid is running something else now.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def boot_id() -> str:
    """This boot of this machine (Linux); a constant elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def started_at(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22) and the boot id,
    or None when no such process runs (or /proc is not there)."""
    try:
        ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot_id()}:{ticks}"


def host() -> str:
    return socket.gethostname()


def identity(pid: int | None = None) -> str:
    """``host|pid|boot:ticks`` of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{host()}|{pid}|{started_at(pid) or 'unknown'}"


def running(ident: str) -> bool | None:
    """True/False when ``ident`` (from ``identity``) is a process of this machine and boot that is /
    is no longer running; None when it belongs to another machine (or cannot be told here)."""
    try:
        h, pid, start = ident.split("|", 2)
    except ValueError:
        return None
    if h != host() or start == "unknown":
        return None
    if not start.startswith(boot_id() + ":"):
        return False  # started before this machine last booted
    return started_at(int(pid)) == start
