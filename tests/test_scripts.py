"""scripts/ by role (bench/, crosscheck/, gpu/): every script at least starts and answers ``--help``,
and a cross-check whose reference package is not installed says so and exits 0. (bench.py runs at
toy size in tests/test_bench.py.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_scripts_are_filed_by_role():
    found = {p.name for p in SCRIPTS.iterdir() if not p.name.startswith((".", "_"))}
    assert found == {"bench", "crosscheck", "gpu"}


# Every script run as __main__ with --help in one interpreter (one torch import, not sixteen).
HELP_ALL = """
import contextlib, io, runpy, sys
bad = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        bad.append(f"{path}: returned without printing help")
    except SystemExit as e:
        if e.code not in (0, None) or "usage:" not in out.getvalue():
            bad.append(f"{path}: exit {e.code}, printed {out.getvalue()[:200]!r}")
print("BAD:", bad)
"""


def test_every_script_answers_help():
    scripts = sorted(str(p) for p in SCRIPTS.rglob("*.py"))
    assert len(scripts) >= 14
    p = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "BAD: []" in p.stdout, (p.stdout + p.stderr)[-3000:]


@pytest.mark.parametrize(("script", "package", "args"), [
    ("crosscheck/crosscheck_autoattack.py", "pyautoattack", ["--small"]),
    ("crosscheck/smoothing_vs_art.py", "art", []),
])
def test_a_crosscheck_without_its_reference_package_is_skipped_cleanly(script, package, args):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the cross-check would run for real")
    p = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "skipped" in p.stderr and "not installed" in p.stderr, p.stderr[-2000:]
