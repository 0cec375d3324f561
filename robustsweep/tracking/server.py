"""A tracking server for many workers: PostgreSQL and ``mlflow server``, started and stopped as one.

    python -m robustsweep.tracking.server start [--dir outputs/server] [--port 5000] [--pg-port 5433]
    eval "$(python -m robustsweep.tracking.server env --show-secrets)"  # exports MLFLOW_TRACKING_URI etc.
    python -m robustsweep -m hydra/launcher=joblib hydra.launcher.n_jobs=4 sparsity=0,0.25,0.5,0.75
    python -m robustsweep.tracking.server stop

Why: one SQLite file answers "database is locked" to concurrent writers (measured, README "Scaling
out"); MLflow and Optuna both support a real database. Everything lives under ``--dir``:

  pgdata/         the PostgreSQL cluster (initdb on first start; reused afterwards)
  socket/         its Unix socket (mode 700); TCP on 127.0.0.1 only, password (SCRAM) required
  credentials     a generated password (mode 600), redacted in every message; ``env`` prints it only
                  with --show-secrets (for ``eval``), masked otherwise
  artifacts/      the artifact store behind the server's proxy (workers upload over HTTP)
  server.json     ports and process ids, for ``stop`` and ``env``
  postgres.log, mlflow.log

Databases ``mlflow`` (the tracking store) and ``optuna`` (RDB storage for ``search=cliff``) are
owned by the role ``robustsweep``. PostgreSQL refuses to run as root, so under root the cluster
runs as the ``postgres`` system user (Debian's package creates it); ``--dir`` must be reachable by
that user. ``stop`` ends the MLflow server's whole process group (gunicorn/uvicorn workers too) and
PostgreSQL (fast shutdown), then checks that no process of either is left.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from robustsweep.core.errors import ConfigError
from robustsweep.core.paths import install_log_redaction, redact_url
from robustsweep.core.process import started_at

log = logging.getLogger(__name__)
ROLE = "robustsweep"
DATABASES = ("mlflow", "optuna")
HEALTH_TIMEOUT_S = 120.0  # MLflow 3 on PostgreSQL answered /health after ~17 s here (migrations)


@dataclass
class State:
    dir: str
    port: int
    pg_port: int
    mlflow_pid: int
    started_s: float  # seconds start() took
    mlflow_started_at: str | None = None  # started_at(mlflow_pid): not some other process after a reboot

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _pg_bin(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                   reverse=True)), None)
    if not found:
        raise ConfigError(f"{name}: PostgreSQL's server binaries are not installed; allowed: install them "
                          f"(Debian/Ubuntu: apt-get install postgresql) or put initdb/pg_ctl on PATH")
    return found


def _pg_user() -> str | None:
    """The system user PostgreSQL runs as: ourselves, or ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError("PostgreSQL cannot run as root and there is no 'postgres' system user; allowed: "
                          "run as an ordinary user, or install Debian's postgresql package") from None
    return "postgres"


def _as_pg(cmd: list[str]) -> list[str]:
    user = _pg_user()
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _password(folder: Path) -> str:
    """The generated password, created once with mode 600 from the start (never readable by others)."""
    path = folder / "credentials"
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    path.chmod(0o600)
    return path.read_text().strip()


def backend_uri(folder: Path, pg_port: int, db: str = "mlflow") -> str:
    """The PostgreSQL URL of one of the server's databases (contains the password: never log it)."""
    return f"postgresql+psycopg2://{ROLE}:{_password(folder)}@127.0.0.1:{pg_port}/{db}"


def _start_postgres(folder: Path, pg_port: int) -> None:
    data, sock = folder / "pgdata", folder / "socket"
    user = _pg_user()
    fresh = not (data / "PG_VERSION").exists()
    for d in (data, sock):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        if user:
            pw = pwd.getpwnam(user)
            os.chown(d, pw.pw_uid, pw.pw_gid)
    if user:  # the postgres user must reach --dir; say so instead of initdb's "permission denied"
        probe = subprocess.run(_as_pg(["test", "-w", str(data)]))
        if probe.returncode != 0:
            raise ConfigError(f"--dir={folder}: the 'postgres' user cannot reach {data}; allowed: a folder "
                              f"whose parents it may traverse (chmod o+x), e.g. under /tmp")
    if fresh:
        _run(_as_pg([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                     "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"]), "initdb")
    logfile = folder / "postgres.log"
    logfile.touch()
    if user:
        pw = pwd.getpwnam(user)
        os.chown(logfile, pw.pw_uid, pw.pw_gid)
    opts = f"-c listen_addresses=127.0.0.1 -p {pg_port} -k {sock}"
    _run(_as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "60", "-o", opts,
                 "start"]), "pg_ctl start")
    # On every start, not only the first: a start that died after initdb, or a credentials file
    # deleted since, must not leave a cluster whose role is missing or has another password.
    password = _password(folder).replace("'", "''")
    sql = [f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN CREATE ROLE {ROLE} "
           f"LOGIN; END IF; END$$;", f"ALTER ROLE {ROLE} LOGIN PASSWORD '{password}';"]
    sql += [f"SELECT 'CREATE DATABASE {db} OWNER {ROLE}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE "
            f"datname = '{db}')\\gexec" for db in DATABASES]
    try:  # over the private socket as the superuser; the password goes on stdin, not argv
        _run(_as_pg([_pg_bin("psql"), "-h", str(sock), "-p", str(pg_port), "-U", "postgres", "-v",
                     "ON_ERROR_STOP=1", "-q", "-f", "-"]), "creating the role and databases",
             input="\n".join(sql) + "\n")
    except Exception:
        _stop_postgres(folder)
        raise


def _pg_running(folder: Path) -> bool:
    """pg_ctl status: 0 running, 3 not running (also with a stale postmaster.pid after a crash)."""
    data = folder / "pgdata"
    if not (data / "PG_VERSION").exists():
        return False
    status = subprocess.run(_as_pg([_pg_bin("pg_ctl"), "-D", str(data), "status"]), capture_output=True)
    return status.returncode == 0


def _stop_postgres(folder: Path) -> None:
    if _pg_running(folder):
        _run(_as_pg([_pg_bin("pg_ctl"), "-D", str(folder / "pgdata"), "-m", "fast", "-w", "-t", "60", "stop"]),
             "pg_ctl stop")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(folder: Path, port: int = 5000, pg_port: int = 5433, workers: int = 2) -> State:
    """Start PostgreSQL and the MLflow server on it; return when /health answers."""
    folder = folder.resolve()
    if (folder / "server.json").exists():
        raise ConfigError(f"--dir={folder}: a server started there is still registered (server.json); allowed: "
                          f"`python -m robustsweep.tracking.server stop --dir {folder}` first")
    if _pg_running(folder):  # left by a start that died after pg_ctl, or a server.json deleted by hand
        _stop_postgres(folder)
    for flag, p in (("--port", port), ("--pg-port", pg_port)):
        if not _port_free(p):
            raise ConfigError(f"{flag}={p}: something already listens on 127.0.0.1:{p}; allowed: a free port")
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    _start_postgres(folder, pg_port)
    (folder / "artifacts").mkdir(exist_ok=True)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_uri(folder, pg_port)}  # not on the command line
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(folder / "mlflow.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers), "--artifacts-destination", str(folder / "artifacts")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    state = State(str(folder), port, pg_port, proc.pid, 0.0, started_at(proc.pid))
    (folder / "server.json").write_text(json.dumps(asdict(state)))
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while not _healthy(port):
        if (rc := proc.poll()) is not None or time.monotonic() > deadline:
            stop(folder)
            tail = (folder / "mlflow.log").read_text(errors="replace")[-1500:]
            how = f"exit {rc}" if rc is not None else "still running"
            raise RuntimeError(f"mlflow server did not answer /health on port {port} within "
                               f"{HEALTH_TIMEOUT_S:.0f} s ({how}); mlflow.log ends:\n{tail}")
        time.sleep(0.5)
    state.started_s = time.perf_counter() - t0
    (folder / "server.json").write_text(json.dumps(asdict(state)))
    log.info("tracking server up in %.1f s: MLflow %s on PostgreSQL 127.0.0.1:%d (%s)", state.started_s,
             state.tracking_uri, pg_port, folder)
    return state


def load(folder: Path) -> State:
    path = folder.resolve() / "server.json"
    if not path.exists():
        raise ConfigError(f"--dir={folder}: no server registered there (no server.json); allowed: the --dir "
                          f"given to start")
    return State(**json.loads(path.read_text()))


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def leftovers(folder: Path) -> list[str]:
    """Server processes still running from ``folder``: PostgreSQL (``-D <folder>/pgdata``) and the MLflow
    server (``--artifacts-destination <folder>/artifacts``) with its workers. What a clean stop leaves:
    nothing. This process and its ancestors (a shell running ``stop --dir ...``) do not count."""
    marks = [str(folder.resolve() / "pgdata"), str(folder.resolve() / "artifacts")]
    skip, out = _ancestors(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(m in cmd for m in marks) and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(f"{proc.name}: {cmd[:200]}")
    return out


def stop(folder: Path, timeout_s: float = 30.0) -> float:
    """Stop the MLflow server's process group and PostgreSQL; return the seconds it took. Raises if a
    process of either is left behind."""
    folder = folder.resolve()
    t0 = time.perf_counter()
    path = folder / "server.json"
    if path.exists():
        state = State(**json.loads(path.read_text()))
        if state.mlflow_started_at and started_at(state.mlflow_pid) != state.mlflow_started_at:
            log.info("mlflow server %d is not running any more (a recycled pid is not signalled)",
                     state.mlflow_pid)
        else:
            _stop_group(state.mlflow_pid, timeout_s)
    _stop_postgres(folder)
    path.unlink(missing_ok=True)
    deadline = time.monotonic() + 10  # SIGKILLed workers take a moment to disappear from /proc
    while (left := leftovers(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        raise RuntimeError("processes left behind after stop:\n  " + "\n  ".join(left))
    seconds = time.perf_counter() - t0
    log.info("tracking server in %s stopped in %.1f s; no process left", folder, seconds)
    return seconds


def _stop_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM the process group, wait for all of it, SIGKILL what is left after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once the whole group is gone
            with contextlib.suppress(ChildProcessError):  # reap it when we are its parent (tests)
                os.waitpid(pgid, os.WNOHANG)
            time.sleep(0.2)
        log.warning("mlflow server group %d still alive after %.0f s: SIGKILL", pgid, timeout_s)
        os.killpg(pgid, signal.SIGKILL)


def env_lines(folder: Path, show_secrets: bool = False) -> str:
    """Shell exports for workers: the server's URI, and the Optuna storage on the same PostgreSQL, its
    password masked (``***``) unless ``show_secrets``: a terminal, a CI log or a screen share is not
    where the password belongs, ``eval "$(... env --show-secrets)"`` is."""
    state = load(folder)
    optuna = backend_uri(Path(state.dir), state.pg_port, "optuna")
    if not show_secrets:
        optuna = redact_url(optuna)
    return f"export MLFLOW_TRACKING_URI={state.tracking_uri}\nexport ROBUSTSWEEP_OPTUNA_STORAGE='{optuna}'\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustsweep.tracking.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("start", "stop", "env", "status"))
    ap.add_argument("--dir", type=Path, default=Path("outputs/server"), help="where everything lives")
    ap.add_argument("--port", type=int, default=5000, help="MLflow server port on 127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1")
    ap.add_argument("--workers", type=int, default=2, help="MLflow server worker processes")
    ap.add_argument("--show-secrets", action="store_true",
                    help="env: print the database password (for eval); masked as *** otherwise")
    args = ap.parse_args(argv)
    install_log_redaction()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "start":
            state = start(args.dir, args.port, args.pg_port, args.workers)
            sys.stdout.write(f"MLFLOW_TRACKING_URI={state.tracking_uri}\n")
        elif args.action == "stop":
            stop(args.dir)
        elif args.action == "env":
            sys.stdout.write(env_lines(args.dir, args.show_secrets))
            if not args.show_secrets:  # a shell comment: harmless under eval, seen by whoever reads it
                where = "" if args.dir == Path("outputs/server") else f" --dir {args.dir}"
                sys.stdout.write(f"# password masked; to export it: eval \"$(python -m "
                                 f"robustsweep.tracking.server env --show-secrets{where})\"\n")
        else:
            state = load(args.dir)
            up = _healthy(state.port)
            sys.stdout.write(f"{state.tracking_uri} {'answers' if up else 'does not answer'}\n")
            return 0 if up else 1
    except (ConfigError, RuntimeError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
