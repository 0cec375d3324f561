"""MLflow: where the store is, and how one job becomes one run.

Store: ``MLFLOW_TRACKING_URI`` from the environment wins (as every MLflow user expects);
otherwise ``tracking.uri`` (default ``sqlite:///outputs/mlflow.db``), with artifacts under
``outputs/mlartifacts``. ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`` from the same
directory shows the same store.

Several processes, one store:
* Relative SQLite paths (in ``tracking.uri`` *or* the environment) are taken from the launch
  directory, so jobs that ``chdir`` into their own folders (``hydra.job.chdir=true``) still write
  to the one store.
* A new SQLite store is created and migrated under a file lock (``<db>.lock``): two processes
  opening a fresh store at once otherwise race in MLflow's schema migration and one crashes.
* Every client call retries with exponential backoff when SQLite answers "database is locked"
  (``Client``); MLflow already waits 20 s per statement, this covers longer writers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from robustsweep.core.errors import ConfigError
from robustsweep.core.params import eps_label
from robustsweep.core.paths import redact_url, resolve_path

log = logging.getLogger(__name__)
T = TypeVar("T")
LOCKED = ("database is locked", "database table is locked")
MIN_FREE_MB = 200  # below this, a sweep stops at start instead of failing mid-write


# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI itself; remember what we set so that
# only a URI the *user* exported counts as "the environment wins".
_SET_BY_US: set[str] = set()


def user_env_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return None if not env or env in _SET_BY_US else env


def resolve_tracking_uri(uri: str) -> str:
    """``MLFLOW_TRACKING_URI`` if the user set it, else ``uri``; relative sqlite paths and plain
    folders (the legacy file store) are made absolute against the launch directory; a bare
    ``postgresql://`` gets the installed driver (``core.paths.with_db_driver``)."""
    from robustsweep.core.paths import with_db_driver

    uri = with_db_driver(user_env_uri() or uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = resolve_path(uri[len(prefix):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if "://" not in uri:
        return str(resolve_path(uri))
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:///`` URI (None for other stores)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):].split("?")[0]) if uri.startswith(prefix) else None


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 8, base_s: float = 0.05,
                 **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with jittered exponential backoff while SQLite says the
    database is locked (the failed transaction was rolled back, so a retry is safe). 8 attempts
    wait up to ~13 s in all; any other error is raised at once."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if i == attempts - 1 or not any(s in str(e) for s in LOCKED):
                raise
            delay = base_s * 2 ** i * (1 + random.random())
            log.warning("MLflow store busy (%s); retry %d of %d in %.2f s",
                        str(e).splitlines()[0][:120], i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Client:
    """``mlflow.MlflowClient`` whose every method call goes through ``retry_locked``."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        return functools.partial(retry_locked, attr) if callable(attr) else attr


_REACHED: set[str] = set()  # servers/databases this process has found answering (checked once)
_READY: set[str] = set()  # stores this process has opened (MLflow caches them per URI)


def ensure_store(uri: str) -> None:
    """Create or migrate a SQLite store under a file lock, so parallel first users don't race.
    Once per process and URI: afterwards MLflow's cached store is reused."""
    from filelock import FileLock

    db = sqlite_path(uri)
    if db is None or uri in _READY:
        return
    with FileLock(str(db) + ".lock", timeout=600):
        Client(uri).search_experiments(max_results=1)  # builds (and caches) the migrated store
    _READY.add(uri)


def check_reachable(uri: str, key: str, timeout_s: float = 10.0) -> None:
    """A tracking server (http/https) answers ``/health``; a database URL (postgresql, mysql) accepts
    a connection with its credentials. Otherwise ConfigError naming ``key``, the URI with its password
    redacted, and what is allowed: before any job is launched, not one failure per job."""
    from robustsweep.core.paths import is_masked, with_db_driver

    uri = with_db_driver(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    shown = redact_url(uri)
    start_one = "start one with `python -m robustsweep.tracking.server start`, or use sqlite:///outputs/mlflow.db"
    if is_masked(uri):  # copied from `server env` without --show-secrets: say so, not "wrong password"
        raise ConfigError(f"{key}={shown}: its password is masked (***); allowed: the real URL, e.g. exported "
                          f"by eval \"$(python -m robustsweep.tracking.server env --show-secrets)\"")
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return  # a server answered (401 behind an auth proxy, ...): reachable; MLflow handles the rest
        except Exception as e:  # refused, unresolvable, timed out, a malformed URI
            why = redact_url(str(getattr(e, "reason", e)))
        raise ConfigError(f"{key}={shown}: no MLflow server answers there ({why}); allowed: the URI of a "
                          f"running tracking server ({start_one})")
    if scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        import sqlalchemy

        try:
            # connect_timeout is a libpq/MySQLdb option; other drivers reject unknown arguments
            timeout = {"connect_timeout": int(timeout_s)} if "+" not in scheme or scheme.endswith(
                ("psycopg2", "psycopg", "mysqldb", "pymysql")) else {}
            engine = sqlalchemy.create_engine(uri, connect_args=timeout)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as e:  # wrong password, no server, missing driver
            why = redact_url(str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise ConfigError(f"{key}={shown}: cannot connect ({type(e).__name__}: {why}); allowed: a "
                              f"database URL whose server is up and whose user/password are right "
                              f"({start_one})") from None


def preflight(cfg: DictConfig) -> None:
    """Before any job: the output folder and the store's folder exist, are writable and have
    room; a tracking server or database answers. Raises ConfigError naming the key, instead of a
    traceback mid-sweep."""
    lease = cfg.tracking.get("lease_s", 60)
    if isinstance(lease, bool) or not isinstance(lease, int | float) or not 5 <= lease <= 86400:
        raise ConfigError(f"tracking.lease_s={lease!r} is not valid; allowed: seconds in [5, 86400] after a "
                          f"cell's last heartbeat before another launcher may take the cell over")
    targets = [("paths.output_dir", resolve_path(cfg.paths.output_dir))]
    uri = resolve_tracking_uri(cfg.tracking.uri)
    key = "MLFLOW_TRACKING_URI" if user_env_uri() else "tracking.uri"
    db = sqlite_path(uri)
    if db is not None:
        targets.append((key, db.parent))
    elif uri not in _REACHED:
        check_reachable(uri, key)
        _REACHED.add(uri)
    if not user_env_uri() and cfg.tracking.get("artifact_dir") and "://" not in str(cfg.tracking.artifact_dir):
        targets.append(("tracking.artifact_dir", resolve_path(cfg.tracking.artifact_dir)))
    _check_writable(targets)
    if db is None or db.is_file():  # an existing store: where does the experiment keep its artifacts?
        _check_experiment_artifacts(cfg, uri)


def _check_writable(targets: list[tuple[str, Path]]) -> None:
    for key, folder in targets:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".robustsweep-write-test.{os.getpid()}"
            with open(probe, "wb") as f:
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"{key}: cannot write to {folder} ({e.strerror or e}); allowed: a "
                              f"writable folder with at least {MIN_FREE_MB} MB free") from e
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < MIN_FREE_MB:
            raise ConfigError(f"{key}: only {free_mb:.0f} MB free on the disk of {folder}; allowed: "
                              f"a folder with at least {MIN_FREE_MB} MB free (checkpoints, figures, "
                              f"the MLflow store)")


_LOCATIONS: set[tuple[str, str]] = set()  # (store, experiment) whose artifact folder this process checked


def _check_experiment_artifacts(cfg: DictConfig, uri: str) -> None:
    """An experiment's artifact location is fixed when it is created: a location that cannot be written
    (created by an older robustsweep, or by hand) would fail every cell only after it computed. Refuse
    it now; say so when ``tracking.artifact_dir`` asks for another folder than the experiment uses."""
    from urllib.parse import unquote, urlparse

    name = str(cfg.tracking.experiment)
    if (uri, name) in _LOCATIONS:
        return
    ensure_store(uri)
    exp = Client(uri).get_experiment_by_name(name)
    if exp is None:
        return
    loc = exp.artifact_location or ""
    parsed = urlparse(loc)
    if parsed.scheme in ("file", ""):
        folder = Path(unquote(parsed.path) if parsed.scheme else loc)
        try:
            _check_writable([("tracking.artifact_dir", folder)])
        except ConfigError as e:
            raise ConfigError(f"{e}. That is where experiment tracking.experiment={name!r} keeps its "
                              f"artifacts (fixed when it was created); allowed: a new "
                              f"tracking.experiment=<name>, or make {folder} writable") from None
        asked = cfg.tracking.get("artifact_dir")
        if asked and not user_env_uri() and "://" not in str(asked) and \
                resolve_path(asked).resolve() != folder.resolve():
            log.warning("tracking.artifact_dir=%s is not where experiment %r keeps its artifacts (%s, fixed "
                        "when it was created): they go there. A new tracking.experiment=<name> uses %s",
                        asked, name, folder, resolve_path(asked))
    _LOCATIONS.add((uri, name))


# The MLflow 3 UI opens an experiment of this kind in its "Model training" runs view, not the GenAI
# one (traces, an assistant panel) it otherwise shows first.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    import mlflow

    from_env = user_env_uri() is not None
    uri = resolve_tracking_uri(cfg.tracking.uri)
    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    if not from_env:  # a URI derived from the user's variable stays the user's on the next call
        _SET_BY_US.add(uri)
    c = Client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # made before robustsweep set it (or by hand): a kind the user chose stays
            c.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    artifact_location = None
    if not from_env and cfg.tracking.get("artifact_dir"):
        artifact_location = resolve_path(cfg.tracking.artifact_dir).resolve().as_uri()
    try:
        return c.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location,
                                   tags={KIND_TAG: TRAINING_KIND})
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        return c.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def hydra_tags() -> dict[str, str]:
    """Sweep dir, job number and output dir of the current Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra.job.name": hc.job.name, "hydra.output_dir": hc.runtime.output_dir,
            "hydra.overrides": redact_url(" ".join(hc.overrides.task))}
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        tags["hydra.sweep.dir"] = str(hc.sweep.dir)
        tags["hydra.job.num"] = str(hc.job.num)
    return tags


PACKAGES = ("torch", "torchvision", "torchattacks", "captum", "mlflow", "optuna", "hydra-core", "numpy")


@functools.cache
def environment_tags() -> dict[str, str]:
    """Where a cell ran, for the report's provenance card: Python and package versions, the CPU
    (model and core count) and GPU."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(p: str) -> str:
        try:
            return version(p)
        except PackageNotFoundError:
            return "absent"

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux: the model name; elsewhere what platform says
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"robustsweep.versions": "; ".join([f"python {platform.python_version()}",
                                               *(f"{p} {v(p)}" for p in PACKAGES)]),
            "robustsweep.machine": f"{cpu}, {os.cpu_count()} cores, {gpu}"}


def params_of(cfg: DictConfig) -> dict[str, str]:
    """The job's config as flat params; passwords in URLs (``search.storage``) redacted."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    container.pop("hydra", None)
    return {k: redact_url(str(v)) for k, v in flatten(container).items()}


def param_entities(cfg: DictConfig) -> list[Any]:
    """``params_of`` as MLflow ``Param``s for ``log_batch`` (values cut to MLflow's 6000 chars)."""
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in params_of(cfg).items()]


# Metrics as the MLflow UI shows them: 4 significant digits (0.9167, not 0.9166666666666666), integers
# (counts) whole. Digits past the 4th are noise next to any interval here (a bootstrap over <= 10^4
# images), but they are still kept: the exact values travel with the run as JSON in the tag
# EXACT_TAG (split into EXACT_TAG, EXACT_TAG.1, ... at MLflow's 8000-character tag limit), and every
# reader that computes (summary, cells.csv, resume, report, checks) reads ``exact_metrics(run)``.
SHOWN_DIGITS = 4
EXACT_TAG = "robustsweep.metrics_exact"
_TAG_CHARS = 8000


def shown(v: float) -> float:
    """``v`` as the UI shows it: 4 significant digits; whole numbers, nan and inf unchanged."""
    v = float(v)
    if not math.isfinite(v) or v == int(v):
        return v
    return float(f"{v:.{SHOWN_DIGITS}g}")


def metric_batch(metrics: dict[str, float], timestamp_ms: int) -> tuple[list[Any], list[Any]]:
    """``metrics`` for one ``log_batch``: the shown (rounded) ``Metric``s and the tags that keep the
    exact values."""
    from mlflow.entities import Metric, RunTag

    exact = json.dumps({k: float(v) for k, v in metrics.items()}, separators=(",", ":"))
    chunks = [exact[i:i + _TAG_CHARS] for i in range(0, len(exact), _TAG_CHARS)]
    return ([Metric(k, shown(v), timestamp_ms, 0) for k, v in metrics.items()],
            [RunTag(EXACT_TAG if i == 0 else f"{EXACT_TAG}.{i}", c) for i, c in enumerate(chunks)])


def exact_metrics(run: Any) -> dict[str, float]:
    """A run's metrics at full precision: the exact values its tags keep over the shown ones (a run
    logged before the tag existed, or a metric logged on its own, has only its stored value)."""
    tags, metrics = run.data.tags, dict(run.data.metrics)
    if EXACT_TAG in tags:
        parts, i = [tags[EXACT_TAG]], 1
        while f"{EXACT_TAG}.{i}" in tags:
            parts.append(tags[f"{EXACT_TAG}.{i}"])
            i += 1
        metrics.update(json.loads("".join(parts)))
    return metrics


def component(node: DictConfig, key: str = "name") -> str:
    """A group node's short name for people: the last part of its ``_target_`` (which wins over a
    name, as in the registries), else its name."""
    target = node.get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else str(node.get(key))


def run_name(cfg: DictConfig) -> str:
    """What tells cells apart first (the MLflow UI cuts names at ~20 characters): sparsity, attack
    and budget, then the compression and the model, e.g. ``s0.50 fgsm 8/255 | l1_unstructured
    small_cnn``; a quantized or fine-tuned cell names that too. A label for people, not an identity
    (cells are identified by ``robustsweep.cell``)."""
    eps = eps_label(float(cfg.epsilon), str(cfg.attack.get("norm") or "linf"))
    extra = [f"{group}={component(node)}" for group, node in later_stages(cfg, "defend")]
    return " ".join([f"s{cfg.sparsity:.2f} {component(cfg.attack)} {eps} |", prune_label(cfg),
                     *extra, component(cfg.model)])


def later_stages(cfg: DictConfig, *more: str) -> list[tuple[str, DictConfig]]:
    """The compression stages after pruning that are on in ``cfg`` (then the ``more`` groups), in
    order, with their nodes: what a cell's labels name after the prune method (run names, figure
    titles)."""
    from robustsweep.steps import compress  # here: this module is imported by processes without torch

    groups = [*(spec.group for spec in compress.stages() if spec.group != "prune"), *more]
    return [(g, cfg[g]) for g in groups
            if isinstance(cfg.get(g), DictConfig) and component(cfg[g]) not in ("none", "None")]


def prune_label(cfg: DictConfig) -> str:
    """The prune method, its schedule when gradual and BN recalibration when on:
    ``global_l1/gradual3+bn256``."""
    bn = cfg.compress.get("bn_recalibrate", 0) if isinstance(cfg.get("compress"), DictConfig) else 0
    return pruning_label(component(cfg.prune, "method"), cfg.prune.get("schedule", "oneshot"),
                         cfg.prune.get("steps"), bn)


def pruning_label(method: str, schedule: str, steps: Any, bn_images: Any) -> str:
    """``prune_label`` from its parts, as a config or a stored run's params (strings) hold them."""
    label = method + (f"/gradual{steps if steps is not None else ''}" if schedule == "gradual" else "")
    return label + (f"+bn{bn_images}" if int(bn_images or 0) else "")

