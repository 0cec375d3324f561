"""MLflow: where the store is, and how one job becomes one run.

Store: ``MLFLOW_TRACKING_URI`` from the environment wins (as every MLflow user expects);
otherwise ``tracking.uri`` (default ``sqlite:///outputs/mlflow.db``), a relative sqlite path being
taken from the launch directory, with artifacts under ``outputs/mlartifacts``. ``mlflow ui
--backend-store-uri sqlite:///outputs/mlflow.db`` from the same directory shows the same store.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustsweep.config import resolve_path

log = logging.getLogger(__name__)


# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI itself; remember what we set so that
# only a URI the *user* exported counts as "the environment wins".
_SET_BY_US: set[str] = set()


def user_env_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return None if not env or env in _SET_BY_US else env


def resolve_tracking_uri(uri: str) -> str:
    """``MLFLOW_TRACKING_URI`` if the user set it; else ``uri``, relative sqlite paths made absolute."""
    env = user_env_uri()
    if env:
        return env
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = resolve_path(uri[len(prefix):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if "://" not in uri:  # a plain folder: the (legacy) file store
        return str(resolve_path(uri))
    return uri


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    import mlflow

    from_env = user_env_uri() is not None
    uri = resolve_tracking_uri(cfg.tracking.uri)
    mlflow.set_tracking_uri(uri)
    _SET_BY_US.add(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if not from_env and cfg.tracking.get("artifact_dir"):
        artifact_location = resolve_path(cfg.tracking.artifact_dir).resolve().as_uri()
    try:
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        return mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id


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
            "hydra.overrides": " ".join(hc.overrides.task)}
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        tags["hydra.sweep.dir"] = str(hc.sweep.dir)
        tags["hydra.job.num"] = str(hc.job.num)
    return tags


def params_of(cfg: DictConfig) -> dict[str, str]:
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    container.pop("hydra", None)
    return {k: str(v) for k, v in flatten(container).items()}


def param_entities(cfg: DictConfig) -> list[Any]:
    """``params_of`` as MLflow ``Param``s for ``log_batch`` (values cut to MLflow's 6000 chars)."""
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in params_of(cfg).items()]


def run_name(cfg: DictConfig) -> str:
    eps255 = cfg.epsilon * 255
    return (f"{cfg.model.name}-{cfg.prune.method}-s{cfg.sparsity:.2f}-"
            f"{cfg.attack.name}-eps{eps255:.3g}/255")

