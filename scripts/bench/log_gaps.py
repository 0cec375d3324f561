"""The longest silence of a command: what a user watching its terminal waits without a new line.

    python scripts/bench/log_gaps.py --out outputs/gaps/aa.log -- python -m robustsweep attack=autoattack ...

Runs the command with stdout and stderr merged, stamps every line (and every progress-bar draw,
also one whose line has not ended yet) with the seconds since start, writes them to ``--out``, and prints
the longest gaps between two consecutive outputs with the line that ended each. Issue 31: nothing
silent for more than ~10 s.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("log_gaps")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the stamped log")
    ap.add_argument("--top", type=int, default=5, help="how many of the longest gaps to print")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stamped: list[tuple[float, str]] = []
    buf = b""
    while chunk := p.stdout.read1(65536):
        now = time.monotonic() - t0
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        stamped += [(now, part.decode(errors="replace")) for part in parts if part.strip()]
        if buf.strip():  # a bar drawn ("\rtext", its line not ended yet) is output a person sees too
            stamped.append((now, buf.decode(errors="replace") + " [drawn, line not ended]"))
    rc = p.wait()
    wall = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(f"{t:8.1f} {line}\n" for t, line in stamped))
    times = [0.0, *(t for t, _ in stamped), wall]
    gaps = sorted(((times[i + 1] - times[i], i) for i in range(len(times) - 1)), reverse=True)[:args.top]
    log.info("%s: exit %d, %.0f s, %d outputs; longest silences:", " ".join(cmd)[:120], rc, wall, len(stamped))
    for gap, i in gaps:
        after = stamped[i - 1][1][:100] if i > 0 else "<start>"
        log.info("  %6.1f s after %7.1f s: %s", gap, times[i], after)
    return rc


if __name__ == "__main__":
    sys.exit(main())
