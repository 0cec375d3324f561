"""A fresh SQLite MLflow store for the price of a file copy, in the tests' own processes.

MLflow creates a new store by running its ~50 schema migrations (alembic): ~2 s of one core per
store (measured 2026-12-07, 2-core box), and nearly every test writes to a store of its own. Here
``mlflow.store.db.utils._initialize_tables`` is replaced, for a new SQLite file only, by a page copy
(SQLite's backup API) of one store this process migrated the real way: the same schema, the same
alembic version, no experiments. A store from an older MLflow (tests/fixtures/, which MLflow upgrades
in place through the same function) still goes the real way: a copy would have erased its runs
(the first version did; test_extend.py's old-store tests failed). The store code under test
(robustsweep.tracking.store: its file lock, its retries) runs unchanged; only MLflow's migration
step is shared.

Installed by tests/conftest.py (the pytest workers) and tests/forked_cli.py (the server that forks
each command; it migrates the template before forking, so every child copies it). Processes a test
starts with ``subprocess`` (the store stress workers, joblib and submitit workers, ``cold`` CLI
runs) are untouched and migrate as users' processes do: tests/test_store.py's fresh-store races
(``tests.store_worker``) and test_cli.py's cold start keep the real path under test.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

_template: Path | None = None


def template() -> Path:
    """This process's migrated, empty store (made on first use)."""
    global _template
    if _template is None:
        import sqlalchemy

        path = Path(tempfile.mkdtemp(prefix="rs-store-template-")) / "mlflow.db"
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        _real(engine)
        engine.dispose()
        _template = path
    return _template


def _empty(path: str) -> bool:
    with sqlite3.connect(path) as con:
        return con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def _copy(engine: Any) -> None:
    """A new, empty SQLite store: the template's pages. Anything else (a store from an older MLflow,
    which MLflow calls this to upgrade in place; another database) the real way."""
    if engine.url.get_backend_name() != "sqlite" or not engine.url.database or not _empty(engine.url.database):
        _real(engine)
        return
    src = sqlite3.connect(template())
    dst = sqlite3.connect(engine.url.database)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


_real: Any = None


def install() -> None:
    """Replace MLflow's table initialisation in this process (idempotent)."""
    global _real
    import mlflow.store.db.utils as db_utils

    if _real is None:
        _real = db_utils._initialize_tables
        db_utils._initialize_tables = _copy
