"""The tests' command lines for the price of one Python start-up: import once, fork a child per command.

A command spends ~5 s of one core importing torch, Hydra, MLflow and robustsweep before it does
anything (measured, 2-core box: a refused command takes ~6 s in all), and the suite runs about a
hundred. Here one server process per test worker imports those modules, computes nothing (so no
thread pool exists to be lost across ``fork``), and runs each command in a forked child as
``python -m <module> <args>`` would: ``runpy`` executes the module as ``__main__`` with
``sys.argv`` set, in the command's working directory and environment, ``sys.path`` starting with
that directory and ``PYTHONPATH``, its own stdout/stderr, and the child's exit status is the
command's (``SystemExit`` handled as the interpreter does: ``None`` -> 0, an int -> itself, a
message -> printed to stderr, 1; atexit handlers run). Each command starts from the modules'
import-time state, as a fresh process would; only the imports are shared, and a new SQLite store is a
copy of one the server migrated (tests/fast_store.py).

Commands a test must signal or watch while they run (SIGKILL, SIGINT, their worker processes) are
started with ``subprocess`` as before; so is every joblib or submitit worker a command starts.

``run(args, cwd, env)`` mirrors ``subprocess.run([python, "-m", module, *args], capture_output=True,
text=True)``; the server is ``python -m tests.forked_cli``, one JSON request per line on stdin.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# What a command imports, less the modules ``runpy`` will execute as ``__main__`` (one already in
# sys.modules would be executed a second time, with a RuntimeWarning on stderr).
# torch._dynamo: every cell counts its model's FLOPs under a TorchDispatchMode, whose first use imports
# it (1.5 s per process, measured 2026-12-07).
PRELOAD = ("hydra", "robustsweep.pipeline", "robustsweep.tracking.store", "mlflow", "captum.attr",
           "torch._dynamo")


class _Server:
    """One per test process, started at its first command and stopped when that process exits."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rs-forked-")
        # unbuffered bytes: readline() takes exactly one line, so select() never misses a buffered one
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forked_cli"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.n = 0
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def _read(self, timeout: float | None) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the forked CLI server exited ({self.proc.poll()})")
        return json.loads(line)

    def run(self, module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess:
        self.n += 1
        out = f"{self.tmp}/{self.n}"
        self.proc.stdin.write((json.dumps({"module": module, "args": args, "cwd": str(cwd), "env": env,
                                           "out": out}) + "\n").encode())
        pid = self._read(30)["pid"]
        try:
            code = self._read(timeout)["code"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(30)
            raise subprocess.TimeoutExpired([module, *args], timeout) from None
        streams = [Path(f"{out}.{s}").read_text(errors="replace") for s in ("stdout", "stderr")]
        for s in ("stdout", "stderr"):
            Path(f"{out}.{s}").unlink()
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, *streams)


_SERVER: _Server | None = None


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, module: str = "robustsweep",
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module *args`` in ``cwd`` with ``env`` (default: this process's environment now),
    as ``subprocess.run(..., capture_output=True, text=True, timeout=timeout)`` returns it."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = _Server()
    return _SERVER.run(module, [str(a) for a in args], Path(cwd), dict(os.environ if env is None else env),
                       timeout)


def run_many(commands: list[dict[str, Any]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``run`` for each ``{"args": [...], "cwd": path[, "env": extra variables][, "module": ...]}``, with
    the environment of this process less MLFLOW_TRACKING_URI, plus the command's ``env``."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return [run(c["args"], c["cwd"], {**base, **c.get("env", {})}, c.get("module", "robustsweep"), timeout)
            for c in commands]


# ----------------------------------------------------------------------------------- the server
def _child(job: dict[str, Any]) -> None:
    """In the forked child: become ``python -m job["module"] *job["args"]``; exits with its status."""
    code: Any = 1
    try:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        # sys.path as ``python -m`` in cwd would have it: cwd first, then PYTHONPATH; and the server's
        # own ``tests`` package forgotten (a command sees it only through PYTHONPATH or cwd)
        extra = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *(p for p in sys.path[1:] if p not in extra)]
        for name in [n for n in sys.modules if n == "tests" or n.startswith("tests.")]:
            del sys.modules[name]
        null = os.open(os.devnull, os.O_RDONLY)  # not the server's request pipe
        os.dup2(null, 0)
        os.close(null)
        for fd, suffix in ((1, "stdout"), (2, "stderr")):
            f = os.open(f"{job['out']}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = [job["module"], *job["args"]]
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # what the interpreter does at exit (MLflow ends its runs there)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from tests import fast_store

    fast_store.install()  # a fresh store is a copy of one migrated here, before any fork
    fast_store.template()
    reply = os.fdopen(os.dup(1), "w", buffering=1)  # requests' answers; fd 1 itself goes to each child
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()  # nothing buffered may be written twice, by the child too
        pid = os.fork()
        if pid == 0:
            reply.close()
            _child(job)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
