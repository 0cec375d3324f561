"""Secrets never written: passwords in tracking/storage URLs are redacted in every file and console line.

Unit tests: ``redact_url`` on a table of texts (and of texts it must leave alone), the process-wide
log-record redaction, the redacted standard streams, ``server env`` masking the password, and the
driver chosen for a bare ``postgresql://`` URI. End to end (``slow``, a real PostgreSQL as in
``tests/test_scaleout.py``): a planted password travels through the CLI in ``tracking.uri`` (a grid
sweep storing its runs in PostgreSQL) and in ``search.storage`` (a cliff search), and no file under
the output folder nor a line of the console carries it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from robustsweep.core import paths
from robustsweep.core.errors import ConfigError
from robustsweep.core.paths import redact_url

# ------------------------------------------------------------------------------ redact_url
HIDDEN = [  # (text, expected): each contains the secret "s3cr3t"
    ("postgresql+psycopg2://u:s3cr3t@host:5432/db", "postgresql+psycopg2://u:***@host:5432/db"),
    ("postgresql://:s3cr3t@host/db", "postgresql://:***@host/db"),  # empty user
    ("postgresql://u:p@s3cr3t@host/db", "postgresql://u:***@host/db"),  # '@' inside the password
    ("postgresql://u:s3/cr+3t=@host/db", "postgresql://u:***@host/db"),  # base64 characters
    ("postgresql://u@host/db?password=s3cr3t", "postgresql://u@host/db?password=***"),
    ("postgresql://u@host/db?sslmode=require&password=s3cr3t&connect_timeout=5",
     "postgresql://u@host/db?sslmode=require&password=***&connect_timeout=5"),
    ("host=h user=u password=s3cr3t dbname=d", "host=h user=u password=*** dbname=d"),
    ("host=h password='s3 cr\\'3t' dbname=d", "host=h password='***' dbname=d"),
    ("Server=h;Uid=u;Pwd=s3cr3t;Database=d", "Server=h;Uid=u;Pwd=***;Database=d"),
    ("MLFLOW_TRACKING_PASSWORD=s3cr3t", "MLFLOW_TRACKING_PASSWORD=***"),
    ("https://user:s3cr3t@mlflow.example.com/", "https://user:***@mlflow.example.com/"),
    ("export ROBUSTSWEEP_OPTUNA_STORAGE='postgresql+psycopg2://robustsweep:s3cr3t@127.0.0.1:5433/optuna'",
     "export ROBUSTSWEEP_OPTUNA_STORAGE='postgresql+psycopg2://robustsweep:***@127.0.0.1:5433/optuna'"),
    ("['tracking.uri=postgresql://u:s3cr3t@h/db', 'paths.output_dir=/tmp/a@b']",
     "['tracking.uri=postgresql://u:***@h/db', 'paths.output_dir=/tmp/a@b']"),
    ('{"storage": "postgresql://u:s3cr3t@h/db"}', '{"storage": "postgresql://u:***@h/db"}'),
    # as Hydra's launcher logs an override: ':', '=' and ' ' escaped with a backslash
    ("#0 : tracking.uri=postgresql+psycopg2\\://robustsweep\\:s3cr3t@127.0.0.1\\:5432/mlflow sparsity=0",
     "#0 : tracking.uri=postgresql+psycopg2\\://robustsweep\\:***@127.0.0.1\\:5432/mlflow sparsity=0"),
    ("postgresql\\://u\\:s3\\ cr3t@h/db", "postgresql\\://u\\:***@h/db"),
    ("postgresql\\://u@h/db?password\\=s3cr3t", "postgresql\\://u@h/db?password\\=***"),
    # a whole YAML file: every URL in it, the rest untouched
    ("tracking:\n  uri: postgresql://u:s3cr3t@h/mlflow\nsearch:\n  storage: mysql://r:s3cr3t@h/o\n"
     "epsilon: 8/255\n- tracking.uri=postgresql://u:s3cr3t@h/mlflow\n",
     "tracking:\n  uri: postgresql://u:***@h/mlflow\nsearch:\n  storage: mysql://r:***@h/o\n"
     "epsilon: 8/255\n- tracking.uri=postgresql://u:***@h/mlflow\n"),
]
UNCHANGED = [
    "http://127.0.0.1:5000",
    "http://host:5000/api/2.0/mlflow?run_id=1&x=2",
    "sqlite:///outputs/mlflow.db",
    "sqlite:////tmp/abs/mlflow.db",
    "postgresql://u@host:5432/db",
    "postgresql+psycopg2://host/db?sslmode=require",
    "8/255",
    "epsilon=8/255 sparsity=0.5 attack=pgd",
    'FATAL:  password authentication failed for user "robustsweep"',
    "mail user@example.com at 12:30, git@github.com:org/repo.git",
    "max_tokens=5 n_tokens=3",
    "the password is shown as ***",
    "",
]


@pytest.mark.parametrize(("text", "expected"), HIDDEN)
def test_redact_url_hides_every_form_of_password(text, expected):
    assert redact_url(text) == expected
    assert redact_url(expected) == expected  # idempotent: redacting twice changes nothing more


@pytest.mark.parametrize("text", UNCHANGED)
def test_redact_url_leaves_text_without_a_password_alone(text):
    assert redact_url(text) == text


def test_redact_url_hides_both_passwords_in_hydras_override_dirname():
    # Hydra joins overrides with ',': one whitespace-free token holding two URLs
    text = "override_dirname: search.storage=postgresql://u:s3cr3t@h/o,tracking.uri=postgresql://u:t0p@h/m"
    shown = redact_url(text)
    assert "s3cr3t" not in shown and "t0p" not in shown
    assert shown.startswith("override_dirname: search.storage=postgresql://u:***@")


def test_redact_file_rewrites_only_files_that_hold_a_secret(tmp_path):
    dirty, clean = tmp_path / "dirty.yaml", tmp_path / "clean.yaml"
    dirty.write_bytes(b"uri: postgresql://u:s3cr3t@h/db\n# \xff not UTF-8\n")
    clean.write_text("uri: sqlite:///outputs/mlflow.db\n")
    dirty.chmod(0o640)
    before = clean.stat().st_mtime_ns, clean.stat().st_ino
    assert paths.redact_file(dirty) is True and paths.redact_file(clean) is False
    assert paths.redact_file(tmp_path / "missing.yaml") is False
    assert dirty.read_bytes() == b"uri: postgresql://u:***@h/db\n# \xff not UTF-8\n"  # other bytes kept
    assert dirty.stat().st_mode & 0o777 == 0o640
    assert (clean.stat().st_mtime_ns, clean.stat().st_ino) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.yaml", "dirty.yaml"]  # no temp left


# ------------------------------------------------------------------------- console and logs
@pytest.fixture
def log_factory():
    """Restore the process's log-record factory after a test installs ours."""
    old = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(old)


def test_log_records_are_redacted_once_installed(log_factory, caplog):
    paths.install_log_redaction()
    installed = logging.getLogRecordFactory()
    paths.install_log_redaction()  # idempotent: not wrapped twice
    assert logging.getLogRecordFactory() is installed
    log = logging.getLogger("robustsweep.test_secrets")
    with caplog.at_level(logging.INFO):
        log.info("\t#%d : %s", 0, "tracking.uri=postgresql://u:s3cr3t@h/db sparsity=0.5")
        log.info("100%% done, eps %s", "8/255")  # no secret: the record is left as it was
        try:
            raise RuntimeError("cannot connect to postgresql://u:s3cr3t@h/db")
        except RuntimeError:
            log.exception("job failed")
    text = caplog.text
    assert "s3cr3t" not in text and "#0 : tracking.uri=postgresql://u:***@h/db" in text
    assert "100% done, eps 8/255" in text and "RuntimeError: cannot connect to postgresql://u:***@h/db" in text


def test_standard_streams_are_redacted_then_restored(capsys):
    out, err = sys.stdout, sys.stderr
    with paths.redacted_std_streams():
        print("tracking.uri=postgresql://u:s3cr3t@h/db")
        sys.stderr.write("Error: mysql://r:s3cr3t@h/o\n")
        assert sys.stderr.isatty() == err.isatty()  # everything else is the wrapped stream's
    assert sys.stdout is out and sys.stderr is err
    got = capsys.readouterr()
    assert got.out == "tracking.uri=postgresql://u:***@h/db\n" and got.err == "Error: mysql://r:***@h/o\n"


def test_cli_main_redacts_a_failure_message_printed_at_exit(monkeypatch, log_factory):
    """A SystemExit with a message (the sweep's list of failed cells, with their overrides) is printed by
    Python after main() has returned: main() redacts it first."""
    import robustsweep.__main__ as cli_main

    def task() -> None:
        raise SystemExit("1 of 2 cells failed:\n  [tracking.uri=postgresql://u:s3cr3t@h/db sparsity=0]")

    monkeypatch.setattr(cli_main, "_task", task)
    with pytest.raises(SystemExit) as e:
        cli_main.main()
    assert "s3cr3t" not in str(e.value.code) and "postgresql://u:***@h/db" in str(e.value.code)


# ------------------------------------------------------------------------------ server env
def test_server_env_masks_the_password_unless_asked(tmp_path, capsys, log_factory):
    from robustsweep.tracking import server

    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "server.json").write_text(json.dumps({"dir": str(folder), "port": 5999, "pg_port": 5998,
                                                    "mlflow_pid": 1, "started_s": 1.0}))
    password = server._password(folder)
    assert server.main(["env", "--dir", str(folder)]) == 0
    masked = capsys.readouterr()
    assert password not in masked.out + masked.err
    assert "export ROBUSTSWEEP_OPTUNA_STORAGE='postgresql+psycopg2://robustsweep:***@127.0.0.1:5998/optuna'" \
        in masked.out and f"env --show-secrets --dir {folder})" in masked.out
    assert server.main(["env", "--dir", str(folder), "--show-secrets"]) == 0
    shown = capsys.readouterr().out
    assert f"robustsweep:{password}@127.0.0.1:5998/optuna" in shown
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5999" in shown


def test_a_masked_password_is_refused_with_the_way_to_the_real_one(tmp_path):
    from robustsweep.search import open_storage
    from robustsweep.tracking.store import check_reachable

    masked = "postgresql+psycopg2://robustsweep:***@127.0.0.1:1/optuna"
    with pytest.raises(ConfigError, match=r"masked.*env --show-secrets"):
        open_storage(masked, tmp_path / "journal.log")
    with pytest.raises(ConfigError, match=r"masked.*env --show-secrets"):
        check_reachable(masked.replace("optuna", "mlflow"), "MLFLOW_TRACKING_URI")


# ---------------------------------------------------------------- postgresql:// gets a driver
@pytest.mark.parametrize(("uri", "without_psycopg3", "with_psycopg3"), [
    ("postgresql://u:p@h/db", "postgresql+psycopg2://u:p@h/db", "postgresql://u:p@h/db"),
    ("postgres://u:p@h/db", "postgresql+psycopg2://u:p@h/db", "postgresql://u:p@h/db"),
    ("POSTGRESQL://h/db", "postgresql+psycopg2://h/db", "POSTGRESQL://h/db"),
    ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
    ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
    ("mysql://u:p@h/db", "mysql://u:p@h/db", "mysql://u:p@h/db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_a_bare_postgresql_uri_gets_an_installed_driver(monkeypatch, uri, without_psycopg3, with_psycopg3):
    from robustsweep.tracking import store

    monkeypatch.setattr(paths, "have_psycopg3", lambda: False)
    assert store.resolve_tracking_uri(uri) == without_psycopg3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the user's variable: the same
    assert store.resolve_tracking_uri("sqlite:///outputs/mlflow.db") == without_psycopg3
    monkeypatch.setattr(paths, "have_psycopg3", lambda: True)
    assert store.resolve_tracking_uri("sqlite:///outputs/mlflow.db") == with_psycopg3


def test_a_bare_postgresql_storage_and_tracking_uri_reach_the_database_driver(tmp_path):
    """Nothing listens on port 1: the error must be the connection's, not a missing psycopg module."""
    from robustsweep.search import open_storage
    from robustsweep.tracking.store import check_reachable

    url = "postgresql://robustsweep:s3cr3t@127.0.0.1:1/optuna"
    with pytest.raises(ConfigError) as storage_error:
        open_storage(url, tmp_path / "journal.log")
    with pytest.raises(ConfigError) as uri_error:
        check_reachable(url, "tracking.uri")
    for e in (storage_error, uri_error):
        assert "OperationalError" in str(e.value) and "psycopg'" not in str(e.value)
        assert "s3cr3t" not in str(e.value) and "robustsweep:***@127.0.0.1:1" in str(e.value)


# -------------------------------------------------- the Optuna sweeper (in process, a fake job)
@pytest.mark.slow
def test_a_failed_trials_error_is_stored_and_shown_redacted(monkeypatch, tmp_path, capfd, log_factory):
    from tests.test_search_cli import _study, run_cli

    def job(cfg):
        s = float(cfg.sparsity)
        if 0.45 < s < 0.55:
            raise RuntimeError("lost postgresql://robustsweep:Pl4ntedS3cret@db.example/optuna")
        return {"asr": 0.3 + (0.35 if s > 0.6137 else 0.0), "clean_acc": 0.9, "robust_acc": 0.6}

    rc = run_cli(monkeypatch, tmp_path, job, "search.n_trials=3", "search.max_failure_rate=0.5")
    assert rc == 0
    (failed,) = [t for t in _study(tmp_path).trials if t.state.name == "FAIL"]
    assert "robustsweep:***@db.example" in failed.user_attrs["error"]
    assert "Pl4ntedS3cret" not in capfd.readouterr().out
    hits = [str(p) for p in tmp_path.rglob("*") if p.is_file() and b"Pl4ntedS3cret" in p.read_bytes()]
    assert hits == []


# ------------------------------------------------------------------ end to end, real PostgreSQL
def _hits(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret`` (binary files too: pickles, databases)."""
    needle = secret.encode()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and needle in p.read_bytes())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """PostgreSQL alone (the tracking server's, ~2 s; no mlflow server: the runs go to its database
    directly) with a planted password, then two commands in one launch folder, the password on their
    command lines as bare ``postgresql://`` URIs: a 2-cell grid sweep with ``tracking.uri`` on the
    database, and a 2-trial ``search=cliff`` with ``search.storage`` too (its reference cell reused
    from the grid: cheap). Returns (launch folder, password, port, console of both commands).
    Skipped without PostgreSQL unless CI requires it, as in test_scaleout."""
    from robustsweep.tracking import server
    from tests.test_scaleout import TINY, _free_port, _have_postgres, _run

    if not _have_postgres():
        if os.environ.get("ROBUSTSWEEP_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL's binaries are missing and ROBUSTSWEEP_REQUIRE_POSTGRES is set")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="rs-secrets-", dir="/tmp"))  # reachable by the postgres user
    folder.chmod(0o755)
    password = f"Pl4nted-{secrets.token_hex(8)}"
    (folder / "server").mkdir()
    (folder / "server" / "credentials").write_text(password)  # the server's role gets this password
    port = _free_port()
    server._start_postgres(folder / "server", port)
    try:
        root = tmp_path_factory.mktemp("secrets")
        db = f"postgresql://robustsweep:{password}@127.0.0.1:{port}"
        common = ["experiment=quickstart", "epsilon=0.1", *TINY, f"tracking.uri={db}/mlflow",
                  "tracking.experiment=secrets", f"paths.output_dir={root}/outputs",
                  f"tracking.artifact_dir={root}/outputs/mlartifacts"]
        outs = []
        for args in (["sparsity=0,0.5"], ["search=cliff", "search.n_trials=2", f"search.storage={db}/optuna"]):
            rc, out = _run(root, "-m", *common, *args, timeout=300)
            assert rc == 0, redact_url(out[-3000:])
            outs.append(out)
        yield root, password, port, "\n".join(outs)
    finally:  # immediate: no shutdown checkpoint (seconds on a busy disk) for a cluster thrown away
        server._run(server._as_pg([server._pg_bin("pg_ctl"), "-D", str(folder / "server" / "pgdata"), "-m",
                                   "immediate", "-w", "-t", "60", "stop"]), "pg_ctl stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_planted_password_is_in_no_file_under_the_output_folder(planted):
    root, password, _, _ = planted
    jobs = sorted((root / "outputs" / "multiruns").glob("*/*/[0-9]"))
    assert len(jobs) == 4 and all((j / ".hydra" / "overrides.yaml").is_file() for j in jobs)
    assert len(list((root / "outputs" / "multiruns").rglob("multirun.yaml"))) >= 2  # both sweepers'
    assert list((root / "outputs" / "mlartifacts").rglob("config.yaml"))  # the runs' artifacts are searched
    assert _hits(root, password) == []


@pytest.mark.slow
def test_a_planted_password_is_in_no_console_line(planted):
    _, password, port, out = planted
    assert password not in out
    # the console did show both URIs (Hydra's launcher escapes ':' in overrides), redacted
    shown = out.replace("\\:", ":")
    assert f"robustsweep:***@127.0.0.1:{port}/mlflow" in shown
    assert f"robustsweep:***@127.0.0.1:{port}/optuna" in shown


@pytest.mark.slow
def test_a_planted_password_is_in_no_mlflow_param_or_tag(planted):
    from mlflow.tracking import MlflowClient

    _, password, port, _ = planted
    client = MlflowClient(f"postgresql+psycopg2://robustsweep:{password}@127.0.0.1:{port}/mlflow")
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) >= 5 and all(r.info.status == "FINISHED" for r in runs)  # 2 parents, 2 cells, 1+ trial
    assert not [k for r in runs for k, v in {**r.data.params, **r.data.tags}.items() if password in v]
