"""Where things are (the launch directory, user paths, the configs) and what must not be shown: passwords
in URLs and connection strings, redacted in texts, files, log records and the standard streams."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


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


MASK = "***"

# ``scheme://user:password@host``. The password runs to the *last* '@' of its whitespace-free token:
# users write ``p@ss`` unencoded, and base64 passwords hold '/', '+' and '='; hiding too much of a
# rare URL with an '@' in its path costs nothing, showing the tail of a password would. The user may
# be empty (``postgresql://:pw@host``). ``\:`` and ``\ ``: Hydra escapes ':', '=' and ' ' when it
# logs or stores an override (``tracking.uri=postgresql\://u\:pw@host``).
_USERINFO = re.compile(r"""(?P<head>://[^\s:/@\\'"]*\\?:)(?:\\\s|\S)*@""")
# ``password=...`` in a URL query (``?password=``, ``&password=``), a libpq key=value string
# (``host=h password=pw``), an ODBC string (``Pwd=pw;``) or a variable (``MLFLOW_TRACKING_PASSWORD=pw``):
# any key ending in one of these words; the value quoted (libpq: ``'a b\'c'``) or up to whitespace,
# '&' or ';'.
_KEY_VALUE = re.compile(
    r"""(?i)(?P<key>(?<![a-z0-9_])[a-z0-9_]*?(?:password|passwd|pwd|secret|token|api_?key))"""
    r"""(?P<eq>\s*\\?=\s*)(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&;'"]+)""")


def _mask_value(m: re.Match[str]) -> str:
    value = m["value"]
    quote = value[0] if value[0] in "'\"" else ""
    return f"{m['key']}{m['eq']}{quote}{MASK}{quote}"


def redact_url(text: str) -> str:
    """``text`` (one URL, a log line, a whole YAML file) with every password hidden: the userinfo of
    URLs (``postgresql://user:***@host/db``: user and host stay visible) and ``password=``-style
    values (``?password=***``, ``host=h password=*** dbname=d``). Idempotent; text without a
    password comes back unchanged. Used before anything is logged, tagged, stored or written."""
    if "://" in text:
        text = _USERINFO.sub(rf"\g<head>{MASK}@", text)
    if "=" in text:
        text = _KEY_VALUE.sub(_mask_value, text)
    return text


def redact_file(path: Path) -> bool:
    """Rewrite ``path`` with ``redact_url`` applied, only when that changes it (a file without a
    password keeps its bytes and mtime); atomically, so a reader never sees half a file, and with the
    file's permissions. True when it was rewritten; a missing file is left missing."""
    try:  # surrogateescape: bytes that are not UTF-8 come back unchanged instead of failing the job
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return False
    shown = redact_url(text)
    if shown == text:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.redact")
    tmp.write_text(shown, encoding="utf-8", errors="surrogateescape")
    os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)
    return True


def is_masked(url: str) -> bool:
    """A URL whose password is the mask (``user:***@``), e.g. copied from ``server env``'s output."""
    return f":{MASK}@" in url.replace("\\:", ":")


# ----------------------------------------------------------------- the console and the log
_FACTORY_MARK = "_robustsweep_redacts"


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when a handler formats the record
        return
    shown = redact_url(message)
    if shown != message:  # only then: records without secrets keep their msg and args for handlers
        record.msg, record.args = shown, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        # Formatter.format uses a cached exc_text when there is one: the traceback's messages
        # (a driver's error quoting the URL) are redacted there
        text = logging.Formatter().formatException(record.exc_info)
        if redact_url(text) != text:
            record.exc_text = redact_url(text)
    if record.stack_info:
        record.stack_info = redact_url(record.stack_info)


def install_log_redaction() -> None:
    """Redact every log record of this process (``redact_url`` on its formatted message and traceback)
    when it is created, whichever logger and handler: Hydra's launcher logs each job's overrides, and
    errors quote URLs. Idempotent (a second call does not wrap the factory again)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, _FACTORY_MARK, False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    setattr(factory, _FACTORY_MARK, True)
    logging.setLogRecordFactory(factory)


class _RedactingStream:
    """A text stream whose ``write`` applies ``redact_url``; everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(redact_url(s) if isinstance(s, str) else s)
        return len(s)  # what the caller asked to write: a shorter redacted text is not a short write

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_std_streams() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` redacted while the block runs: what bypasses logging (Hydra's
    traceback and error printing, warnings, ``print``) shows no password either. Restored afterwards
    unless someone replaced them meanwhile."""
    saved = sys.stdout, sys.stderr
    wrapped = tuple(s if isinstance(s, _RedactingStream) else _RedactingStream(s) for s in saved)
    sys.stdout, sys.stderr = wrapped  # type: ignore[assignment]
    try:
        yield
    finally:
        if (sys.stdout, sys.stderr) == wrapped:
            sys.stdout, sys.stderr = saved


# ----------------------------------------------------------------------- database drivers
@functools.lru_cache(maxsize=1)
def have_psycopg3() -> bool:
    """psycopg 3 (``psycopg``), SQLAlchemy 2.1's default PostgreSQL driver, imports here. An import,
    not a spec lookup: psycopg 3 without a libpq installed is there but unusable."""
    try:
        importlib.import_module("psycopg")
    except Exception:
        return False
    return True


def with_db_driver(url: str) -> str:
    """A bare ``postgresql://`` (or ``postgres://``, which SQLAlchemy rejects) URL with a driver that is
    installed: SQLAlchemy 2.1 takes psycopg 3 for a bare scheme, while this project depends on
    psycopg2-binary, so without psycopg 3 it becomes ``postgresql+psycopg2://``. Other URLs (a driver
    named, another database, a file path) are returned as they are."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return url
    if have_psycopg3():
        return url if scheme.lower() == "postgresql" else f"postgresql://{rest}"
    return f"postgresql+psycopg2://{rest}"


# The configs: an installed wheel ships them as robustsweep/conf; the source tree and an editable
# install read <repo>/conf.
_PKG = Path(__file__).resolve().parent.parent
CONF_DIR = _PKG / "conf" if (_PKG / "conf").is_dir() else _PKG.parent / "conf"
