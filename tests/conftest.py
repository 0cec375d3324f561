"""Shared fixtures: an isolated outputs/ + MLflow store per test, and a trained digits model.

The digits model is built once per process (session scope) and shared by every test that asks for
it, so a test, or a product function it calls, that leaves it changed (weights, BatchNorm
statistics, train mode, a hook, ``requires_grad``, a pruning reparametrisation) silently changes
the numbers of every later test in that process: with pytest-xdist, which tests those are depends
on how the files were split over the workers (issue 32: ``test_ig_completeness`` off by 0.92).
``_digits_model_unchanged`` compares the model, its dataset and its config before and after every
test that uses them, fails that test naming what changed, and puts the fixture back, so the
culprit is the test that fails and no later test inherits the change.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robustsweep.config import compose
from robustsweep.core.guards import state_tensors
from tests import fast_store

fast_store.install()  # a new SQLite store: a copy of one migrated store, not ~2 s of migrations

# Under pytest-xdist (``-n 2`` on CI's 2 cores) each worker gets one core: torch's intra-op threads
# in this process, and OMP_NUM_THREADS for every CLI subprocess a test starts. Two workers with two
# threads each fought over the cores and made the parallel suite slower than the serial one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)



def isolated_overrides(tmp: Path) -> list[str]:
    """Overrides that keep outputs, caches and the MLflow store inside ``tmp``."""
    return [
        f"paths.output_dir={tmp}/outputs",
        f"tracking.uri=sqlite:///{tmp}/outputs/mlflow.db",
        f"tracking.artifact_dir={tmp}/outputs/mlartifacts",
    ]


# Small and fast: digits, few training epochs, few IG steps.
FAST = ["train.epochs=8", "attribution.n_images=2", "attribution.n_steps=16"]


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it. The CLI run in-process (``robustsweep.__main__.main``)
    sets the launch id, the sweep's parent run and the launcher's identity there for its jobs; left
    behind, a later test's subprocesses inherited them (two fresh launches got the same launch id)."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _fresh_reuse_caches() -> None:
    """Each test starts without models or predictions cached by an earlier one (robustsweep.tracking.reuse)."""
    from robustsweep.tracking import reuse

    reuse.clear()


@pytest.fixture
def make_cfg(tmp_path: Path):
    def _make(*overrides: str) -> DictConfig:
        return compose([*isolated_overrides(tmp_path), *FAST, *overrides])

    return _make


# ------------------------------------------------------------------------ what "unchanged" means
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_SCALARS = (bool, int, float, str, type(None), tuple)


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return f"{t.dtype}|{tuple(t.shape)}|{t.device.type}|{hashlib.sha256(raw).hexdigest()}"


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about ``model`` that can change what it computes or how a later caller sees it,
    entry by entry so that a difference can be named: every state_dict tensor (quantized ones by
    their integer values and scales) and non-persistent buffer, each module's type, train/eval
    flag, hooks and plain attributes (e.g. ``qconfig``, BatchNorm's ``momentum``), each parameter's
    ``requires_grad`` and whether it holds a ``.grad``."""
    snap: dict[str, Any] = {}
    for name, v in state_tensors(model):
        snap[f"state {name}"] = _digest(v) if isinstance(v, torch.Tensor) else repr(v)
    persistent = model.state_dict().keys()
    for name, b in model.named_buffers():
        if name not in persistent:
            snap[f"buffer {name}"] = _digest(b)
    for name, m in model.named_modules():
        where = name or "<root>"
        snap[f"type {where}"] = type(m).__qualname__
        snap[f"training {where}"] = m.training
        for h in _HOOK_DICTS:
            if getattr(m, h, None):
                snap[f"{h} {where}"] = tuple(getattr(m, h))  # hook ids: a new hook has a new id
        for k, v in vars(m).items():
            if not k.startswith("_") and k != "training":
                snap[f"attribute {where}.{k}"] = repr(v) if isinstance(v, _SCALARS) else type(v).__qualname__
    for name, p in model.named_parameters():
        snap[f"requires_grad {name}"] = p.requires_grad
        snap[f"grad {name}"] = p.grad is not None
    return snap


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs, one line per entry (added, removed or changed)."""
    out = []
    for k in sorted(before.keys() | after.keys()):
        a, b = before.get(k, "<absent>"), after.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {str(a)[:60]} -> {str(b)[:60]}")
    return out


def _dataset_snapshot(ds: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for k, v in sorted(vars(ds).items()):
        if isinstance(v, torch.Tensor):
            snap[k] = _digest(v)
        elif not callable(v):
            snap[k] = repr(v)
    for k in ("x_train", "y_train", "mean", "std"):  # lazily loaded: the same objects every call
        v = getattr(ds, k)
        snap[k] = _digest(v) if isinstance(v, torch.Tensor) else repr(v)
    return snap


def _cfg_snapshot(cfg: DictConfig) -> dict[str, Any]:
    """Key by key (``train.epochs``), unresolved, so that a change is named by its key."""
    snap: dict[str, Any] = {"<struct>": OmegaConf.is_struct(cfg), "<readonly>": OmegaConf.is_readonly(cfg)}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, item in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), item)
        elif isinstance(v, list) and v:
            for i, item in enumerate(v):
                walk(f"{prefix}[{i}]", item)
        else:
            snap[prefix] = repr(v)

    walk("", OmegaConf.to_container(cfg, resolve=False))
    return snap


def _process_snapshot() -> dict[str, Any]:
    """Process-wide torch state a test can leave flipped; each changes every later forward or
    gradient (a model that runs with grad disabled gives IG no gradient at all; a global forward
    hook runs on every module of every model)."""
    snap: dict[str, Any] = {
        "grad enabled": torch.is_grad_enabled(), "inference mode": torch.is_inference_mode_enabled(),
        "default dtype": torch.get_default_dtype(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled()}
    for h in _GLOBAL_HOOKS:
        snap[f"torch.nn.modules.module.{h}"] = tuple(getattr(torch.nn.modules.module, h, {}))
    return snap


# ----------------------------------------------------------------------------- the digits model
@pytest.fixture(scope="session")
def _digits_pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any, DictConfig]:
    """The trained model, its dataset and config: built once per process, shared (``digits_model``)."""
    from robustsweep.config import validate
    from robustsweep.steps.data import load_dataset
    from robustsweep.steps.train import get_baseline

    tmp = tmp_path_factory.mktemp("digits")
    cfg = validate(compose([*isolated_overrides(tmp), *FAST]))
    ds = load_dataset(cfg.data)
    model, info = get_baseline(cfg, ds, torch.device("cpu"), tmp / "cache")
    assert info["test_acc"] > 0.9, info["test_acc"]
    # training leaves the last step's .grad on every parameter: drop it, so that a test (or a
    # function it calls) that accumulates gradients into the shared model is seen
    model.zero_grad(set_to_none=True)
    return model, ds, cfg


@pytest.fixture(scope="session")
def _digits_reference(_digits_pristine: tuple[nn.Module, Any, DictConfig]) -> dict[str, Any]:
    """Deep copies out of every test's reach, and their snapshots: what the shared fixture is
    compared with after each test, and repaired from."""
    model, ds, cfg = _digits_pristine
    return {"model": copy.deepcopy(model), "ds": copy.deepcopy(ds), "cfg": copy.deepcopy(cfg),
            "snapshot": (model_snapshot(model), _dataset_snapshot(ds), _cfg_snapshot(cfg))}


@pytest.fixture(scope="session")
def digits_model(_digits_pristine: tuple[nn.Module, Any, DictConfig]) -> tuple[nn.Module, Any, DictConfig]:
    """A small CNN trained on digits (~1 s), with its dataset and config, shared by the session.

    Read-only: a test that leaves any of the three changed fails (``_digits_model_unchanged``). A
    test that must change the model takes ``digits_model_copy`` (or its own ``copy.deepcopy``)."""
    return _digits_pristine


@pytest.fixture
def digits_model_copy(digits_model: tuple[nn.Module, Any, DictConfig]) -> tuple[nn.Module, Any, DictConfig]:
    """A private deep copy of ``digits_model``'s model (dataset and config shared) to change at will."""
    model, ds, cfg = digits_model
    return copy.deepcopy(model), ds, cfg


def _repair(obj: Any, reference: Any) -> None:
    """Put ``obj`` back to ``reference`` in place (same object: later tests hold it via the session
    fixture), hooks, modes, submodules and attributes included."""
    fresh = copy.deepcopy(reference)
    if isinstance(obj, DictConfig):
        OmegaConf.set_readonly(obj, False)
        OmegaConf.set_struct(obj, False)
        for k in list(obj.keys()):
            del obj[k]
        obj.merge_with(fresh)
        OmegaConf.set_struct(obj, OmegaConf.is_struct(fresh))
        OmegaConf.set_readonly(obj, OmegaConf.is_readonly(fresh))
    else:
        obj.__dict__.clear()
        obj.__dict__.update(fresh.__dict__)


@pytest.fixture(autouse=True)
def _digits_model_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a test that uses ``digits_model``: fail it if it leaves the model, dataset, config or
    torch's grad/dtype switches changed, naming what changed, and repair the shared fixture so
    the next test starts from the trained model (one culprit, one failure)."""
    if "digits_model" not in request.fixturenames:
        yield
        return
    ref = request.getfixturevalue("_digits_reference")
    model, ds, cfg = request.getfixturevalue("digits_model")
    process = _process_snapshot()
    yield
    ref_model, ref_ds, ref_cfg = ref["snapshot"]
    changed = {"the model": snapshot_diff(ref_model, model_snapshot(model)),
               "the dataset": snapshot_diff(ref_ds, _dataset_snapshot(ds)),
               "the config": snapshot_diff(ref_cfg, _cfg_snapshot(cfg)),
               "torch's process state": snapshot_diff(process, _process_snapshot())}
    if not any(changed.values()):
        return
    for what, obj, key in (("the model", model, "model"), ("the dataset", ds, "ds"),
                           ("the config", cfg, "cfg")):
        if changed[what]:
            _repair(obj, ref[key])
    if changed["torch's process state"]:
        torch.set_grad_enabled(process["grad enabled"])
        torch.set_default_dtype(process["default dtype"])
        torch.use_deterministic_algorithms(process["deterministic algorithms"])
        for h in _GLOBAL_HOOKS:  # a hook registered during the test and left behind
            hooks = getattr(torch.nn.modules.module, h, {})
            for k in set(hooks) - set(process[f"torch.nn.modules.module.{h}"]):
                del hooks[k]
    lines = [f"  {what}: {line}" for what, diff in changed.items() for line in diff[:12]]
    more = sum(len(d) for d in changed.values()) - len(lines)
    pytest.fail(f"{request.node.nodeid} left the session fixture digits_model changed (it is shared "
                f"by every later test in this process; repaired now):\n" + "\n".join(lines)
                + (f"\n  ... and {more} more" if more > 0 else ""), pytrace=False)
